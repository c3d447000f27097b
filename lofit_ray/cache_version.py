"""The version of the code behind every cached value (phase-1 memo, DPO reference log-probs on disk).

A change to any module that computes a cached value gives a new CACHE_VERSION, so old entries miss instead
of being reused. train.phase1_key and losses.data_key read it as `cache_version.CACHE_VERSION`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

CODE_MODULES = ("train.py", "losses.py", "offsets.py", "batching.py", "frozen_layers.py", "architectures.py",
                "heads.py", "selectors.py")


def source_hash(folder: Path = Path(__file__).parent) -> str:
    """A hash of the source of CODE_MODULES in `folder` (the package's own by default)."""
    digest = hashlib.sha256()
    for name in CODE_MODULES:
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    return digest.hexdigest()[:12]


CACHE_VERSION = source_hash()
