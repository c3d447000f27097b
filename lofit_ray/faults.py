"""Named fault points, so tests fail a run at an exact place instead of after a sleep.

$LOFIT_FAULTS lists the points to fire, comma-separated; each may carry filters on the context the
code passes at that point: `trial.diverge@phase2_lr=0.5` fires only in the trial whose phase2_lr is
0.5; `driver.kill@at=registered` kills the driver right after a model version is registered.
Unset (the normal case), every call is a dictionary lookup that returns False.
"""
from __future__ import annotations

import os
import signal

FAULTS_ENV = "LOFIT_FAULTS"


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
    if triggered(point, **context):
        print(f"[lofit-ray] fault point {point} {context}: killing "
              f"{'process group ' + str(process_group) if process_group else 'process ' + str(os.getpid())}",
              flush=True)
        if process_group:
            os.killpg(process_group, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
