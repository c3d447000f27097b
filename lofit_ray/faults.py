"""Named fault points, so tests fail a run at an exact place instead of after a sleep.

$LOFIT_FAULTS lists the points to fire, comma-separated; each may carry filters on the context the
code passes at that point: `trial.diverge@phase2_lr=0.5` fires only in the trial whose phase2_lr is
0.5; `driver.kill@at=registered` kills the driver right after a model version is registered.
Unset (the normal case), every call is a dictionary lookup that returns False.
With $LOFIT_FAULTS_ONCE_DIR set, each kill point fires at most once across all processes (a marker file
holds the pid it killed), so a restarted Ray Train worker runs past the point that killed its predecessor.
"""
from __future__ import annotations

import os
import signal

FAULTS_ENV = "LOFIT_FAULTS"
ONCE_DIR_ENV = "LOFIT_FAULTS_ONCE_DIR"


def triggered(point: str, **context) -> bool:
    """True when $LOFIT_FAULTS names `point` with filters that all match `context` (compared as strings)."""
    for entry in filter(None, (e.strip() for e in os.environ.get(FAULTS_ENV, "").split(","))):
        name, _, filters = entry.partition("@")
        if name != point:
            continue
        pairs = [f.partition("=") for f in filters.split("&") if f]
        if all(str(context.get(key)) == value for key, _, value in pairs):
            return True
    return False


def kill_point(point: str, process_group: int | None = None, **context) -> None:
    """SIGKILL here when the point is triggered: a crash that runs no cleanup at all. Kills this process,
    or a whole process group (a trial passes its driver's, to kill the search at a point inside a trial)."""
    if triggered(point, **context) and _first_time(point, context):
        print(f"[lofit-ray] fault point {point} {context}: killing "
              f"{'process group ' + str(process_group) if process_group else 'process ' + str(os.getpid())}",
              flush=True)
        if process_group:
            os.killpg(process_group, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def _first_time(point: str, context: dict) -> bool:
    """False when $LOFIT_FAULTS_ONCE_DIR holds this point's marker already; otherwise claim it (atomically)."""
    once_dir = os.environ.get(ONCE_DIR_ENV)
    if not once_dir:
        return True
    marker = os.path.join(once_dir, point + "".join(f"-{k}={v}" for k, v in sorted(context.items())))
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True
