#!/usr/bin/env bash
# Write requirements/lock-cuda.txt: the exact versions of what PyPI's Linux build of the locked torch pulls in
# beside requirements/lock.txt (CUDA libraries, triton). Resolved from PyPI's metadata with `pip install --dry-run
# --report` (no wheel is downloaded; ignores pip's local config, whose wheel folder may hold a CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
REPORT=$(mktemp)
CERT=()
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then CERT=(--cert /etc/ssl/certs/ca-certificates.crt); fi
TORCH=$(grep -E '^torch==' requirements/lock.txt)
"$PY" -m pip --isolated install "${CERT[@]}" --dry-run --ignore-installed --quiet --report "$REPORT" \
  --index-url https://pypi.org/simple -c requirements/lock.txt "$TORCH"
"$PY" - "$REPORT" "$TORCH" <<'PY'
import json, re, sys
report, torch = sys.argv[1], sys.argv[2]
locked = {re.split(r"[=<>]", l)[0].lower().replace("_", "-")
          for l in open("requirements/lock.txt") if l.strip() and not l.startswith("#")}
pins = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in json.load(open(report))["install"]
              if i["metadata"]["name"].lower().replace("_", "-") not in locked)
with open("requirements/lock-cuda.txt", "w") as f:
    f.write(f"# What PyPI's Linux build of {torch} (CUDA) installs beside requirements/lock.txt (x86_64; resolved on\n"
            "# Python 3.11, every pin has a wheel for the Pythons of requirements/lock.txt: scripts/pythons.sh --wheels).\n"
            "# scripts/setup.sh adds it as a second constraints file for TORCH=cuda. Written by scripts/lock_cuda.sh\n"
            "# (from PyPI's metadata: torch itself pins most of these exactly); the suite runs on the CPU build.\n")
    f.write("\n".join(pins) + "\n")
print(f"requirements/lock-cuda.txt: {len(pins)} pins")
PY
