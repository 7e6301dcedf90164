"""File helpers that several packages need, written once."""

from __future__ import annotations

import hashlib
import os
import re


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 16 MiB blocks (shards and weights are GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


# A JSON object file can carry the sha256 of its own bytes as its last key ("sealed"): the hash covers
# every byte before the `,` that opens the trailer, so any flipped, cut or appended byte is found, and
# the file stays plain JSON that any reader (vLLM, json.load) takes as it is.
def _trailer(key: str) -> re.Pattern:
    return re.compile(rb',\n  "' + re.escape(key.encode()) + rb'": "([0-9a-f]{64})"\n}\n\Z')


def seal_json(data: bytes, key: str) -> bytes:
    """`data` (one JSON object) with `"key": "<sha256 of what precedes it>"` appended as its last field."""
    body = data.rstrip()
    assert body.endswith(b"}") and body[:-1].rstrip() != b"{", "seal a non-empty JSON object"
    body = body[:-1].rstrip()
    return body + f',\n  "{key}": "{hashlib.sha256(body).hexdigest()}"\n}}\n'.encode()


def seal_problem(data: bytes, key: str) -> str | None:
    """Why `data` fails its seal, in words (None when it passes)."""
    m = _trailer(key).search(data)
    if m is None:
        return f"its checksum field '{key}' is missing or not at the end of the file"
    found = hashlib.sha256(data[: m.start()]).hexdigest()
    if found != m.group(1).decode():
        return f"its bytes hash to sha256 {found[:16]}..., its '{key}' says {m.group(1).decode()[:16]}..."
    return None
