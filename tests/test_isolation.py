"""Tests touch only what they started: a Ray cluster someone else runs on this machine survives the session.

A throwaway cluster stands in for one a user started by hand (`ray start --head`, the user's RAY_ADDRESS
pointing at it). The session's environment (conftest.isolated_env) must make an address-less `ray.init()`
start its own local cluster instead of attaching, the session's cleanup (ray_util.stop_ray_cluster on the
session's temp dir, what replaced the machine-wide forced `ray stop`) must stop what the session left running and nothing
else, and at the end the throwaway is stopped by its own temp dir only.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SESSION_ROOT, SHARED_CACHES, isolated_env, short_tempdir
from ray_util import cluster_alive, free_port, ray_cluster_pids, stop_ray_cluster, wait_until

pytestmark = pytest.mark.slow

# An address-less ray.init() and what it attached to, as a test's driver would do it.
DRIVER = """
import json, ray
ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
node = ray._private.worker._global_node
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "session": node.get_session_dir_path(),
                  "started_here": node.head}))
ray.shutdown()
"""


def _ray_start(env: dict, port: int) -> None:
    proc = subprocess.run([str(Path(sys.executable).with_name("ray")), "start", "--head", "--port", str(port),
                           "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--include-dashboard", "false",
                           "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port()),
                           "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def users_cluster():
    """A cluster as a user starts one: `ray start --head` (Ray temp dir and GCS port of its own), the
    user's shell pointing RAY_ADDRESS and RAY_TMPDIR at it, and an MLflow server of theirs."""
    temp = short_tempdir("lofit-user-ray.")
    port = free_port()
    env = {**os.environ, "RAY_TMPDIR": str(temp), "RAY_AUTH_MODE": "token"}
    try:
        _ray_start(env, port)
        assert wait_until(lambda: cluster_alive(temp_dir=temp), 60)
        yield {"temp": temp, "port": port,
               "user_env": {**env, "RAY_ADDRESS": f"127.0.0.1:{port}",
                            "MLFLOW_TRACKING_URI": "http://mlflow.users-own.invalid:5000"}}
    finally:
        stop_ray_cluster(temp_dir=temp)  # by its temp dir: nothing else on the machine
        shutil.rmtree(temp, ignore_errors=True)
    assert not ray_cluster_pids(temp_dir=temp), "the throwaway cluster outlived its own stop"


def test_the_users_cluster_is_what_a_plain_ray_init_would_join(users_cluster):
    """The control: with the user's own environment, an address-less ray.init() attaches to the throwaway."""
    out = subprocess.run([sys.executable, "-c", DRIVER], env=users_cluster["user_env"], capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["gcs"].endswith(f":{users_cluster['port']}") and not seen["started_here"]
    assert cluster_alive(temp_dir=users_cluster["temp"])


def test_the_session_starts_its_own_ray_and_leaves_nothing_running(users_cluster, tmp_path):
    root = short_tempdir("lofit-test-iso.")
    try:
        env = isolated_env(users_cluster["user_env"], root)
        assert "RAY_ADDRESS" not in env and "MLFLOW_TRACKING_URI" not in env
        assert env["LOFIT_HOME"].startswith(str(root)) and env["LOFIT_REFERENCE_CACHE"].startswith(str(root))
        out = subprocess.run([sys.executable, "-c", DRIVER], env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        assert seen["started_here"] and not seen["gcs"].endswith(f":{users_cluster['port']}")
        assert seen["session"].startswith(str(root / "ray"))  # and its state stays in the session's dir
        # ray.shutdown() took the driver's own cluster down with it: nothing of it keeps running
        assert wait_until(lambda: not ray_cluster_pids(temp_dir=seen["session"]), 30), "local Ray left running"
        assert cluster_alive(temp_dir=users_cluster["temp"])
    finally:
        stop_ray_cluster(temp_dir=root)
        shutil.rmtree(root, ignore_errors=True)


def test_the_cleanup_stops_what_the_session_left_and_nothing_else(users_cluster):
    """A failed test left its `ray start` cluster running: the session's cleanup (stop_ray_cluster on the
    session's temp dir) stops it, and only it."""
    root = short_tempdir("lofit-test-iso.")
    try:
        env = isolated_env(users_cluster["user_env"], root)
        _ray_start(env, free_port())
        assert wait_until(lambda: cluster_alive(temp_dir=root), 60)
        assert (root / "ray" / "ray_current_cluster").is_file()
        stopped = stop_ray_cluster(temp_dir=root)
        assert stopped and not ray_cluster_pids(temp_dir=root)
        assert not (root / "ray" / "ray_current_cluster").exists()  # a later ray.init() will not try to join it
        assert not stopped & ray_cluster_pids(temp_dir=users_cluster["temp"])
        assert cluster_alive(temp_dir=users_cluster["temp"]), "the cleanup stopped a cluster it did not start"
    finally:
        stop_ray_cluster(temp_dir=root)
        shutil.rmtree(root, ignore_errors=True)


def test_the_session_itself_is_isolated():
    assert os.environ["RAY_TMPDIR"] == str(SESSION_ROOT) and "RAY_ADDRESS" not in os.environ
    assert Path(os.environ["LOFIT_HOME"]).is_relative_to(SESSION_ROOT)
    assert Path(os.environ["LOFIT_REFERENCE_CACHE"]).is_relative_to(SESSION_ROOT)
    assert "MLFLOW_TRACKING_URI" not in os.environ and "RAY_AUTH_TOKEN" not in os.environ
    assert Path(os.environ["RAY_AUTH_TOKEN_PATH"]).is_relative_to(SESSION_ROOT)  # not ~/.ray/auth_token
    assert Path(os.environ["LOFIT_CACHE_DIR"]).is_relative_to(SESSION_ROOT)  # not ~/.cache/lofit-ray


def test_the_session_caches_datasets_in_its_root_and_shares_only_converted_models(tmp_path):
    """$LOFIT_CACHE_DIR is the session's: a data file read through `datasets` (as fuzzed files are) leaves its
    Arrow cache there, never in the user's ~/.cache/lofit-ray/datasets. Only the model conversion caches
    (models/, gguf/) reach the user's cache, on purpose (converting SmolLM2 takes minutes)."""
    from lofit_ray.paths import cache_dir
    from lofit_ray.tasks.source import datasets_cache, read_records

    users = Path.home() / ".cache" / "lofit-ray"  # the default; scripts/test.sh leaves the user's own value
    assert cache_dir().is_relative_to(SESSION_ROOT) and datasets_cache().resolve().is_relative_to(SESSION_ROOT)
    for name in SHARED_CACHES:  # linked, so what the session converts is there for the user, and vice versa
        assert (cache_dir() / name).resolve() != (cache_dir() / name)
        assert not (cache_dir() / name).resolve().is_relative_to(SESSION_ROOT)
    before = set((users / "datasets").rglob("*")) if (users / "datasets").is_dir() else set()
    data = tmp_path / "rows.csv"
    data.write_text("question,answer\nsky?,blue\n")
    assert read_records(data) == [{"question": "sky?", "answer": "blue"}]
    assert [p for p in datasets_cache().rglob("*") if p.is_file()], "datasets wrote no cache where it was told"
    after = set((users / "datasets").rglob("*")) if (users / "datasets").is_dir() else set()
    # another process of the user's may add entries meanwhile; none of them is this read's csv cache
    assert not {p for p in after - before if "csv" in p.parts and p.is_file()
                and p.stat().st_mtime >= data.stat().st_mtime}, "the session wrote into ~/.cache/lofit-ray"


def test_a_sub_environment_isolates_the_cache_too(tmp_path):
    root = short_tempdir("lofit-test-iso.")
    try:
        env = isolated_env({**os.environ, "LOFIT_CACHE_DIR": str(tmp_path / "users-cache")}, root)
        assert env["LOFIT_CACHE_DIR"] == str(root / "cache")
        for name in SHARED_CACHES:
            assert (root / "cache" / name).resolve() == (tmp_path / "users-cache" / name).resolve()
        assert sorted(p.name for p in (tmp_path / "users-cache").iterdir()) == sorted(SHARED_CACHES)
    finally:
        shutil.rmtree(root, ignore_errors=True)
