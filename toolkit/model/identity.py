"""Identity of a base checkpoint, cheap even for 28 GB: name, size and sha256 of its first and last 16 MiB.

Adapters record it so inference and export can tell whether they are given the base the adapter was trained on.
A diffusers folder is fingerprinted file by file (sorted names).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

FINGERPRINT_BYTES = 16 << 20


def _update(digest, path: Path) -> int:
    size = path.stat().st_size
    with open(path, "rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(size - FINGERPRINT_BYTES, FINGERPRINT_BYTES))
            digest.update(f.read())
    return size


def file_fingerprint(path: str | os.PathLike) -> dict:
    """{file_name, path, size, sha256_head_tail} of a checkpoint file or folder."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        size = 0
        for file in files:
            digest.update(str(file.relative_to(path)).encode())
            size += _update(digest, file)
    else:
        size = _update(digest, path)
    return {"file_name": path.name, "path": str(path.resolve()), "size": size, "sha256_head_tail": digest.hexdigest()}
