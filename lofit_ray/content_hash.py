"""Content hashes of files, computed once per file and remembered by (path, size, mtime).

Cache keys that depend on a model's weights (models.fingerprint: the phase-1 memo, the DPO reference
log-probs) and the GGUF conversion folder are named by what the files hold, so a checkpoint that differs
anywhere, even in one value of its last layer, misses. Hashing a 500 MB file takes a second or two; the
index ($LOFIT_CACHE_DIR/file-hashes.json) makes every later load of an unchanged file free. A file in the
Hugging Face cache is a link into blobs/, named by its own hash: that name is used, nothing is read.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .paths import cache_dir

CHUNK = 1 << 20  # bytes read at a time: memory stays flat whatever the file's size


def index_path() -> Path:
    return cache_dir() / "file-hashes.json"


def _read_index() -> dict:
    try:
        return json.loads(index_path().read_text())
    except (OSError, ValueError):  # none yet, or torn by a crash: start again (entries are only a speed-up)
        return {}


def _write_index(index: dict) -> None:
    path = index_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(index, indent=0, sort_keys=True))
    tmp.replace(path)  # atomic: concurrent writers lose at worst an entry, which is hashed again later


def file_hash(path: str | os.PathLike) -> str:
    """The hex digest of a file's content: its HF-cache blob name, the index's entry while the file's size and
    mtime are those it was hashed at, else sha256 of its bytes (streamed, then remembered)."""
    path = Path(path)
    real = path.resolve()
    if path.is_symlink() and real.parent.name == "blobs":  # huggingface_hub names blobs by sha256 (git sha1 if small)
        return real.name
    stat = real.stat()
    key = str(real)
    entry = _read_index().get(key)
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    index = _read_index()
    index[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    _write_index(index)
    return digest.hexdigest()
