"""Named fault points, so tests fail a run at an exact place instead of after a sleep.

$LOFIT_FAULTS lists the points to fire, comma-separated; each may carry filters on the context the
code passes at that point: `trial.diverge@phase2_lr=0.5` fires only in the trial whose phase2_lr is
0.5; `driver.kill@at=registered` kills the driver right after a model version is registered.
Unset (the normal case), every call is a dictionary lookup that returns False.
With $LOFIT_FAULTS_ONCE_DIR set, each kill point fires at most once across all processes (a marker file
holds the pid it killed), so a restarted Ray Train worker runs past the point that killed its predecessor.
A hold point stops the process there (the first time) until something outside kills it: a test taking a whole
node down at an exact place (`worker.hold@rank=1&epoch=1`). A meeting point (`meet`) holds each process that
reaches it until N have: `phase1.meet@n=2` proves that two trials were inside phase 1 at the same time (run
one after the other, the first would wait in vain).
"""
from __future__ import annotations

import os
import signal
import time
import uuid

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


class FaultTimeout(RuntimeError):
    """A meeting point waited longer than its timeout for the others: they never ran at the same time; or
    nothing killed a process held at a hold point."""


def hold_point(point: str, timeout: float = 600, **context) -> None:
    """Wait here when the point is triggered (once across processes with $LOFIT_FAULTS_ONCE_DIR: its marker,
    holding this pid, tells a test where to strike) until this process is killed; FaultTimeout after
    `timeout` seconds if nothing does."""
    if triggered(point, **context) and _first_time(point, context):
        print(f"[lofit-ray] fault point {point} {context}: holding process {os.getpid()} until it is killed",
              flush=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.5)  # waiting to be killed: nothing here decides when
        raise FaultTimeout(f"fault point {point}: held {timeout:g} s and nothing killed process {os.getpid()}")


def meet(point: str, **context) -> None:
    """When $LOFIT_FAULTS names `point@n=N` (optionally `&timeout=S`, default 300, and context filters as for
    `triggered`): leave a marker in $LOFIT_FAULTS_ONCE_DIR and wait until N processes have reached this point
    (markers on a shared file system); after S seconds without them, raise FaultTimeout."""
    for entry in filter(None, (e.strip() for e in os.environ.get(FAULTS_ENV, "").split(","))):
        name, _, filters = entry.partition("@")
        pairs = dict(f.split("=", 1) for f in filters.split("&") if "=" in f)
        parties, timeout = int(pairs.pop("n", 2)), float(pairs.pop("timeout", 300))
        if name != point or not all(str(context.get(k)) == v for k, v in pairs.items()):
            continue
        where = os.environ[ONCE_DIR_ENV]
        with open(os.path.join(where, f"{point}.{os.getpid()}.{uuid.uuid4().hex}"), "w"):
            pass
        deadline = time.monotonic() + timeout
        while sum(f.startswith(point + ".") for f in os.listdir(where)) < parties:
            if time.monotonic() > deadline:
                raise FaultTimeout(f"fault point {point}: {parties} processes never met here within {timeout:g} s")
            time.sleep(0.1)  # polling the condition, not a guess at how long the others take
        print(f"[lofit-ray] fault point {point} {context}: {parties} processes met", flush=True)
        return
