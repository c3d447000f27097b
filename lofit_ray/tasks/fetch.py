"""`lofit-ray data fetch`: the paper's splits of all three tasks, in one step, into the data dir.

The files are the ones LoFiT's repository (github.com/fc2869/lo-fit, folder dataset/) ships, laid out the
way the tasks' split names expect: truthfulqa/fold_{0,1}_{train,val,test}_seed_42.csv, mquake/*.jsonl,
clutrr/*.json. Each file is downloaded to a temporary name, read back through the task's own reader, and
only then renamed into place, so an interrupted fetch never leaves a half file that looks like data.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from .base import TaskDataError
from .source import WAYS_TO_SUPPLY, read_records

PAPER_DATA_URL = "https://raw.githubusercontent.com/fc2869/lo-fit/main/dataset/"
# path under the repository's dataset/ -> path under the data dir
PAPER_FILES = {
    **{f"truthfulqa/fold_{f}_{s}_seed_42.csv": f"truthfulqa/fold_{f}_{s}_seed_42.csv"
       for f in (0, 1) for s in ("train", "val", "test")},
    **{f"MQuAKE/{s}.jsonl": f"mquake/{s}.jsonl" for s in ("train", "val", "test")},
    **{f"clutrr/{s}.json": f"clutrr/{s}.json" for s in ("train", "val", "test")},
}


def fetch_paper_data(dest: str | os.PathLike, base_url: str = PAPER_DATA_URL, force: bool = False,
                     timeout: float = 60.0, log=print) -> list[Path]:
    """Download every file of PAPER_FILES under `dest` (skipping those already there unless `force`);
    returns the paths written."""
    dest = Path(dest).expanduser()
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    written = []
    for remote, local in PAPER_FILES.items():
        target = dest / local
        if target.is_file() and not force:
            log(f"[data] {target} already there")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part" + target.suffix)  # keeps the suffix the reader needs
        url = base_url + remote
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
                out.write(response.read())
        except (urllib.error.URLError, OSError) as exc:
            partial.unlink(missing_ok=True)
            raise TaskDataError(f"could not download {url} ({getattr(exc, 'reason', exc)}). "
                                f"{WAYS_TO_SUPPLY}") from exc
        try:
            n = len(read_records(partial))
        except TaskDataError:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, target)
        written.append(target)
        log(f"[data] {target} ({n} rows)")
    return written
