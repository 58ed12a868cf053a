"""A minimal Hugging Face Hub-compatible HTTP server for tests (stdlib `http.server`, bound to 127.0.0.1).

It serves the endpoints `huggingface_hub` 2.4 calls for ``create_repo``, ``create_commit`` (``upload_folder``,
``push_to_hub``) and downloads (``hf_hub_download``: ``HEAD``/``GET`` on ``resolve``), observed by running
``model.push_to_hub``, ``Trainer.push_to_hub`` and ``PeftModel.from_pretrained`` against it and logging every
request (``HubServer.requests``; any other endpoint answers 404 and is logged, so a test can assert none was hit):

- ``POST /api/repos/create``                         -> ``{"url", "name"}`` (409 if it exists)
- ``POST /api/validate-yaml``                        -> the README's metadata parses as a YAML mapping
- ``POST /api/{type}s/{repo}/preupload/{rev}``       -> every file ``uploadMode: regular`` (content inline)
- ``POST /api/{type}s/{repo}/commit/{rev}``          -> applies the NDJSON ``header``/``file``/``deletedFile``/
  ``deletedFolder`` lines, ``{"commitUrl", "commitOid"}``
- ``GET  /api/{type}s/{repo}[/revision/{rev}]``      -> repo info (``sha``, ``siblings``)
- ``GET  /api/{type}s/{repo}/tree/{rev}[/{path}]``   -> the file list
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``          -> the file, with ``X-Repo-Commit``, ``ETag``, ``Content-Length``
  (404 with ``X-Error-Code: RepoNotFound`` / ``EntryNotFound``)

What it does not do: LFS/Xet uploads (it always answers ``regular``, so large files travel base64-encoded in the
commit; the real Hub sends ``*.safetensors`` through LFS/Xet), auth (any token is accepted), branches other than
the one revision, pull requests. Commits are real: each gets a sha1 over its parent and its files, and a download
resolves the revision to the latest commit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, repo_id: str, repo_type: str):
        self.repo_id, self.repo_type = repo_id, repo_type
        self.files: dict[str, bytes] = {}
        self.commits: list[tuple[str, str]] = [(hashlib.sha1(f"init {repo_id}".encode()).hexdigest(), "initial")]

    @property
    def sha(self) -> str:
        return self.commits[-1][0]

    def commit(self, summary: str, added: dict[str, bytes], deleted: list[str], deleted_folders: list[str]) -> str:
        for path in deleted:
            self.files.pop(path, None)
        for folder in deleted_folders:
            prefix = folder.rstrip("/") + "/"
            for path in [p for p in self.files if p.startswith(prefix)]:
                del self.files[path]
        self.files.update(added)
        digest = hashlib.sha1(self.sha.encode())
        for path in sorted(self.files):
            digest.update(path.encode() + b"\0" + git_blob_sha(self.files[path]).encode())
        self.commits.append((digest.hexdigest(), summary))
        return self.sha


class HubServer:
    """``with HubServer() as hub: ...`` serves on ``hub.endpoint`` (127.0.0.1, a free port) in a thread."""

    def __init__(self):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                server.handle(self, "HEAD")

            def do_GET(self):
                server.handle(self, "GET")

            def do_POST(self):
                server.handle(self, "POST")

            def do_DELETE(self):
                server.handle(self, "DELETE")

            def do_PUT(self):
                server.handle(self, "PUT")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)

    # --- HTTP ---------------------------------------------------------------------------------------------------
    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = unquote(urlsplit(h.path).path)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        try:
            status, headers, payload = self.route(method, path, body)
        except Exception as err:  # a bug here must show in the client's error, not hang it
            status, headers, payload = 500, {}, json.dumps({"error": repr(err)}).encode()
        with self.lock:
            self.requests.append((method, path, status))
        h.send_response(status)
        headers.setdefault("Content-Type", "application/json")
        for key, value in headers.items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(payload)

    @staticmethod
    def _json(obj, status: int = 200, **headers):
        return status, dict(headers), json.dumps(obj).encode()

    @staticmethod
    def _error(status: int, code: str, message: str):
        return status, {"X-Error-Code": code, "X-Error-Message": message}, json.dumps({"error": message}).encode()

    def _repo(self, repo_type: str, repo_id: str):
        return self.repos.get((repo_type, repo_id))

    def route(self, method: str, path: str, body: bytes):
        parts = [p for p in path.split("/") if p]
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self.create_repo(json.loads(body or b"{}"))
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return self.validate_yaml(json.loads(body)["content"])
        if len(parts) >= 4 and parts[0] == "api" and parts[1] in ("models", "datasets", "spaces"):
            repo_type, repo_id, rest = parts[1][:-1], f"{parts[2]}/{parts[3]}", parts[4:]
            repo = self._repo(repo_type, repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            if method == "POST" and rest[:1] == ["preupload"]:
                files = json.loads(body)["files"]
                return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                              "oid": None} for f in files], "commitOid": repo.sha})
            if method == "POST" and rest[:1] == ["commit"]:
                return self.commit(repo, body)
            if method == "GET" and (not rest or rest[:1] == ["revision"]):
                return self._json(self.info(repo))
            if method == "GET" and rest[:1] == ["tree"]:
                prefix = "/".join(rest[2:])
                return self._json([{"type": "file", "path": p, "size": len(d), "oid": git_blob_sha(d)}
                                   for p, d in sorted(repo.files.items()) if p.startswith(prefix)])
            return self._error(404, "NotImplemented", f"{method} {path} is not served by this test server")
        if method in ("HEAD", "GET") and len(parts) >= 5 and "resolve" in parts:
            i = parts.index("resolve")
            prefix = parts[:i]
            repo_type = "model"
            if prefix[0] in ("datasets", "spaces"):
                repo_type, prefix = prefix[0][:-1], prefix[1:]
            repo = self._repo(repo_type, "/".join(prefix))
            if repo is None:
                return self._error(404, "RepoNotFound", f"Repository {'/'.join(prefix)} not found")
            filename = "/".join(parts[i + 2:])
            if filename not in repo.files:
                return self._error(404, "EntryNotFound", f"{filename} does not exist at {parts[i + 1]}")
            data = repo.files[filename]
            return 200, {"X-Repo-Commit": repo.sha, "ETag": f'"{git_blob_sha(data)}"',
                         "Content-Type": "application/octet-stream"}, data
        return self._error(404, "NotImplemented", f"{method} {path} is not served by this test server")

    def create_repo(self, request: dict):
        repo_type = request.get("type") or "model"
        name = request["name"]
        repo_id = name if "/" in name else f"{request.get('organization') or 'user'}/{name}"
        url = f"{self.endpoint}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        if (repo_type, repo_id) in self.repos:
            return self._json({"error": "You already created this model repo", "url": url}, 409)
        self.repos[(repo_type, repo_id)] = Repo(repo_id, repo_type)
        return self._json({"url": url, "name": repo_id})

    def validate_yaml(self, content: str):
        """The README's metadata block must be a YAML mapping (the Hub checks more: known licenses, etc.)."""
        import yaml

        if not content.startswith("---"):
            return self._json({"warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
        try:
            meta = yaml.safe_load(content.split("---", 2)[1])
        except (yaml.YAMLError, IndexError) as err:
            return self._json({"errors": [{"message": f"invalid YAML: {err}"}]}, 400)
        if not isinstance(meta, dict):
            return self._json({"errors": [{"message": "metadata must be a YAML mapping"}]}, 400)
        return self._json({"warnings": []})

    def commit(self, repo: Repo, body: bytes):
        summary, added, deleted, folders = "", {}, [], []
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, "BadRequest", f"unsupported encoding {value.get('encoding')}")
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.append(value["path"])
            elif key == "deletedFolder":
                folders.append(value["path"])
            else:  # lfsFile / copies: never asked for, since preupload answers "regular"
                return self._error(400, "BadRequest", f"unsupported commit operation {key}")
        sha = repo.commit(summary, added, deleted, folders)
        return self._json({"commitUrl": f"{self.endpoint}/{repo.repo_id}/commit/{sha}", "commitOid": sha,
                           "pullRequestUrl": None, "success": True})

    def info(self, repo: Repo) -> dict:
        return {"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.sha, "private": False,
                "siblings": [{"rfilename": p} for p in sorted(repo.files)], "tags": [], "downloads": 0,
                "likes": 0}
