"""The request a client sends to a ``beacon-peft-serve`` server to answer from a saved memory.

A prompt that continues a memory is the memory's placeholder ids (`prefix.PrefixInfo.placeholder_ids`: one per
prefix entry, derived from the memory's checksum) followed by the question's token ids; the request names the
memory in ``kv_transfer_params`` (``{"beacon_memory": NAME, "beacon_row": ROW}``), and the connector loads the
memory's K/V into the blocks of the placeholders. ``cache_salt`` (the memory's checksum) keeps prefix-cache
blocks of different memories apart a second time. The question is tokenized (and chat-formatted) by the client,
as ``beacon-peft ask`` formats it (`beacon_peft.chat.ChatFormat.prompt`).

``NAME`` is the memory folder as the *server* sees it: a path, or a name under the server's memory root
(``--memory-root``); `completion_request` reads the folder's JSON on the client to count placeholders, so client
and server see the same folder here (``memory=`` the local copy, ``name=`` the server's name otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .prefix import describe


def completion_request(memory, question_ids: Sequence[int], model: str, row: int = 0,
                       name: Optional[str] = None, **sampling) -> dict:
    """The JSON body of a ``/v1/completions`` request answering ``question_ids`` from the saved ``memory``.

    ``sampling`` goes into the body as is (``max_tokens``, ``temperature``, ...)."""
    ids = list(question_ids)
    if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError(f"question_ids must be a non-empty sequence of int token ids, got {question_ids!r}")
    info = describe(memory, row)
    return {
        "model": model,
        "prompt": info.placeholder_ids() + ids,
        "kv_transfer_params": {"beacon_memory": name if name is not None else str(Path(memory)), "beacon_row": row},
        "cache_salt": info.memory_id,
        **sampling,
    }
