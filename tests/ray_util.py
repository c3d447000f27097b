"""Find and stop ONE Ray cluster by its temp dir or GCS port, never every cluster on the machine.

A machine-wide `ray stop` (forced) kills every Ray process of the user, including a cluster someone started by hand
with `ray start`. Tests stop what they started instead:

    stop_ray_cluster(temp_dir="/tmp/lofit-test.x/ray")   # a `ray start --temp-dir` / $RAY_TMPDIR/ray cluster
    stop_ray_cluster(port=6380)                          # a `ray start --head --port 6380` cluster
    python tests/ray_util.py --stop /tmp/lofit-test.x    # the same from a shell (scripts/test.sh)

A cluster's daemons (gcs_server, raylet, dashboard, monitors, log monitor, client server) name its temp dir
(--temp-dir, --session-dir, --log_dir, socket paths) or its GCS address (--gcs-address HOST:PORT,
--gcs_server_port PORT) on their command lines; its workers and agents are children of its raylet.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path

import psutil


def _names_dir(arg: str, root: str) -> bool:
    """`arg` holds the path `root` or a path below it (not merely a path starting with the same text)."""
    at = arg.find(root)
    while at >= 0:
        end = at + len(root)
        if end == len(arg) or arg[end] in "/ ,\"'":
            return True
        at = arg.find(root, at + 1)
    return False


def _names_port(arg: str, port: int) -> bool:
    """`arg` is --gcs_server_port=PORT, or a GCS address HOST:PORT (--gcs-address, the client server's --address)."""
    key, _, value = arg.partition("=")
    if key == "--gcs_server_port":
        return value == str(port)
    return key in ("--gcs-address", "--gcs_address", "--address") and value.rpartition(":")[2] == str(port)


def _gcs_port(arg: str) -> int | None:
    key, _, value = arg.partition("=")
    if key == "--gcs_server_port" and value.isdigit():
        return int(value)
    if key in ("--gcs-address", "--gcs_address") and value.rpartition(":")[2].isdigit():
        return int(value.rpartition(":")[2])
    return None


def _ray_processes() -> list[tuple[int, list[str]]]:
    """(pid, command line) of Ray's own executables and scripts (.../ray/core/.../raylet, python -u
    .../ray/x.py, python -m ray.x), this process excepted."""
    out = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        args = proc.info.get("cmdline") or []
        if proc.info["pid"] != os.getpid() and any("ray" in a for a in args[:3]):
            out.append((proc.info["pid"], args))
    return out


def _find(temp_dir, port) -> tuple[set[int], set[int], set[str]]:
    """(pids, GCS ports, Ray temp dirs) of the cluster named by `temp_dir` or `port` (see ray_cluster_pids)."""
    if temp_dir is None and port is None:
        raise ValueError("name the cluster: temp_dir= (its `ray start --temp-dir`) or port= (its GCS port)")
    processes = _ray_processes()
    ports = {port} if port is not None else set()
    daemons = {}
    if temp_dir is not None:
        root = str(Path(temp_dir).resolve())
        for pid, args in processes:
            if any(_names_dir(a, root) for a in args):
                daemons[pid] = args
                ports.update(p for p in map(_gcs_port, args) if p is not None)
    for pid, args in processes:
        if any(_names_port(a, p) for a in args for p in ports):
            daemons[pid] = args
    temp_dirs = {a.partition("=")[2] for args in daemons.values() for a in args
                 if a.startswith(("--temp-dir=", "--temp_dir="))}
    pids = set(daemons)
    for pid in daemons:
        with contextlib.suppress(psutil.Error):
            pids.update(child.pid for child in psutil.Process(pid).children(recursive=True))
    pids.discard(os.getpid())
    return pids, ports, temp_dirs


def ray_cluster_pids(temp_dir: str | os.PathLike | None = None, port: int | None = None) -> set[int]:
    """Pids of the Ray cluster whose temp dir is `temp_dir` (or lies below it) or whose GCS listens on `port`:
    the daemons that name it on their command line, and every descendant of theirs (workers, agents).

    A temp dir also yields the cluster's GCS port, which finds the daemons that name only that (the Ray
    client server)."""
    return _find(temp_dir, port)[0]


def terminate(procs: list, grace: float = 20.0) -> None:
    """SIGTERM these psutil processes, then SIGKILL whichever is still alive after `grace` seconds, and wait
    (up to 10 s) until the killed ones are gone."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    survivors = psutil.wait_procs(procs, timeout=grace)[1]
    for proc in survivors:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    # SIGKILL is not instant: a process is listed until the kernel has torn it down
    psutil.wait_procs(survivors, timeout=10)


def _processes(pids) -> list:
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            found.append(psutil.Process(pid))
    return found


def stop_ray_cluster(temp_dir: str | os.PathLike | None = None, port: int | None = None,
                     timeout: float = 20.0) -> set[int]:
    """Stop only the cluster `ray_cluster_pids(temp_dir, port)` finds: SIGTERM, then SIGKILL whatever is
    still alive after `timeout` seconds, and remove its address from its temp dir's ray_current_cluster
    (as `ray stop` does). Returns the pids it signalled (empty if no such cluster runs)."""
    pids, ports, temp_dirs = _find(temp_dir, port)
    terminate(_processes(pids), timeout)
    # workers a dying raylet forked meanwhile: one more sweep, no grace
    late = ray_cluster_pids(temp_dir, port) - pids
    terminate(_processes(late), 0)
    # like `ray stop`: forget the address a later address-less ray.init() would otherwise try to join
    for address_file in (Path(d) / "ray_current_cluster" for d in temp_dirs):
        with contextlib.suppress(OSError):
            if address_file.read_text().strip().rpartition(":")[2] in {str(p) for p in ports}:
                address_file.unlink()
    return pids | late


def cluster_alive(temp_dir: str | os.PathLike | None = None, port: int | None = None) -> bool:
    """True while the cluster's GCS server and raylet both run."""
    names = set()
    for pid in ray_cluster_pids(temp_dir, port):
        try:
            names.add(Path(psutil.Process(pid).cmdline()[0]).name)
        except (psutil.Error, IndexError):
            pass
    return {"gcs_server", "raylet"} <= names


def wait_until(condition, timeout: float = 30.0, every: float = 0.5) -> bool:
    """Poll `condition()` until it is true or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return bool(condition())
        time.sleep(every)
    return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a test cluster's GCS, dashboard or client server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--stop":
        sys.exit("usage: python tests/ray_util.py --stop TEMP_DIR_OR_GCS_PORT")
    target = sys.argv[2]
    stopped = stop_ray_cluster(port=int(target)) if target.isdigit() else stop_ray_cluster(temp_dir=target)
    print(f"stopped {len(stopped)} Ray processes of the cluster at {target}" if stopped else
          f"no Ray cluster runs at {target}")
