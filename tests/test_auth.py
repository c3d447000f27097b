"""Authentication tried, not just written: an MLflow server with basic auth and a Ray cluster with token auth,
each started here on 127.0.0.1, refuse a client without credentials and serve one with them; a search given
wrong MLflow credentials stops before Ray starts, naming the variables to set.

Every process started here is stopped here (the MLflow server by its process group, Ray by its temp dir).
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import short_tempdir, skip_or_fail
from mlflow_server import MlflowServer
from ray_util import free_port, ray_cluster_pids, stop_ray_cluster, wait_until

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
ADMIN = "lofit-admin"
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
pytestmark = pytest.mark.slow


def _get(url: str, headers: dict | None = None) -> tuple[int, str]:
    """(HTTP status, body) of a GET; an error status is an answer too."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# -- MLflow basic auth ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """`mlflow server --app-name basic-auth --workers 1` with its own user DB; the admin's password is new."""
    import importlib.util

    if importlib.util.find_spec("flask_wtf") is None:  # what mlflow[auth] adds: the app will not start without
        skip_or_fail("MLflow's basic-auth app needs mlflow[auth] (Flask-WTF): pip install -e '.[dev]'")
    password = secrets.token_urlsafe(16)
    server = MlflowServer(tmp_path_factory.mktemp("auth_server"), admin=(ADMIN, password))
    try:
        server.wait_healthy()  # /health needs no credentials
        yield {"url": server.url, "password": password}
    finally:
        server.stop()


def test_the_mlflow_server_refuses_a_client_without_credentials(auth_server, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    url, password = auth_server["url"], auth_server["password"]
    api = f"{url}/api/2.0/mlflow/experiments/search?max_results=10"
    assert _get(api)[0] == 401
    assert _get(api, _basic(ADMIN, password + "x"))[0] == 401
    status, body = _get(api, _basic(ADMIN, password))
    assert status == 200 and json.loads(body)["experiments"], body
    # MLflow's own client: refused without credentials, served with them from the environment
    for var in CREDENTIALS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
        MlflowClient(tracking_uri=url).search_experiments()
    monkeypatch.setenv(CREDENTIALS[0], ADMIN)
    monkeypatch.setenv(CREDENTIALS[1], password)
    assert any(e.name == "Default" for e in MlflowClient(tracking_uri=url).search_experiments())


def _search(url: str, env: dict, ray_tmp: Path, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**env, "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "token"}
    return subprocess.run([sys.executable, str(REPO / "jobs" / "search.py"), "--config", str(SMOKE),
                           "--tracking-uri", url, *extra], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=ray_tmp)


@pytest.mark.parametrize("credentials", ["none", "wrong password"])
def test_a_search_with_bad_mlflow_credentials_stops_before_ray_naming_the_variables(auth_server, credentials):
    """Exit 2, one line on stderr naming MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, and no Ray
    cluster ever started (no session dir under the search's own RAY_TMPDIR), so no trial ran."""
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIALS}
    if credentials == "wrong password":
        env.update({CREDENTIALS[0]: ADMIN, CREDENTIALS[1]: auth_server["password"] + "-wrong"})
    ray_tmp = short_tempdir("lr-auth.")
    try:
        started = time.monotonic()
        proc = _search(auth_server["url"], env, ray_tmp)
        took = time.monotonic() - started
        err = proc.stderr.strip()
        assert proc.returncode == 2, f"exit {proc.returncode}:\n{proc.stdout[-2000:]}\n{err[-3000:]}"
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        assert all(var in err for var in CREDENTIALS) and "HTTP 401" in err, err
        assert ("are set but not accepted" if credentials == "wrong password" else "neither is set") in err, err
        assert not list(ray_tmp.glob("ray/session_*")) and not ray_cluster_pids(temp_dir=ray_tmp), \
            "Ray was started before the credentials were checked"
        print(f"refused ({credentials}) in {took:.1f} s: {err}")
    finally:
        stop_ray_cluster(temp_dir=ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_search_with_credentials_from_the_environment_records_on_the_auth_server(auth_server, monkeypatch):
    from mlflow import MlflowClient

    from lofit_ray import tracking

    url, password = auth_server["url"], auth_server["password"]
    env = {**os.environ, CREDENTIALS[0]: ADMIN, CREDENTIALS[1]: password}
    ray_tmp = short_tempdir("lr-auth.")
    try:
        proc = _search(url, env, ray_tmp, "--set", "search.num_trials=2", "--set", "search.asha=false",
                       "--set", "search.controls=0")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        stop_ray_cluster(temp_dir=ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    monkeypatch.setenv(CREDENTIALS[0], ADMIN)  # MLflow's client reads them from the environment
    monkeypatch.setenv(CREDENTIALS[1], password)
    c = MlflowClient(tracking_uri=url, registry_uri=url)
    exp = c.get_experiment_by_name("lofit-smoke")
    runs = c.search_runs([exp.experiment_id], max_results=100)
    trials = [r for r in runs if r.data.tags.get(tracking.KIND_TAG) == "trial"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials), trials
    name = tracking.registered_name("tiny-llama", "truthfulqa")
    assert c.get_model_version_by_alias(name, tracking.CHAMPION).run_id in {r.info.run_id for r in trials}


# -- Ray token auth ------------------------------------------------------------------------------------------

def test_ray_refuses_a_client_without_the_token(tmp_path):
    """A head started here with token auth (RAY_AUTH_MODE=token, a token of its own): the job REST API and
    `ray job list` answer with the token and refuse without it or with another one."""
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    token, other = secret / "auth_token", secret / "other_token"
    for path in (token, other):
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    ray_tmp = short_tempdir("lr-auth.")
    dashboard = free_port()
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    ray = str(Path(sys.executable).with_name("ray"))
    jobs = f"http://127.0.0.1:{dashboard}/api/jobs/"
    bearer = {"Authorization": f"Bearer {token.read_text()}"}
    try:
        start = subprocess.run([ray, "start", "--head", "--port", str(free_port()), "--node-ip-address", "127.0.0.1",
                                "--num-cpus", "1", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                                "--dashboard-port", str(dashboard), "--ray-client-server-port", str(free_port()),
                                "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats"],
                               env=env, capture_output=True, text=True, timeout=180)
        assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]

        def answers():
            try:
                return _get(jobs, bearer)[0] == 200
            except OSError:  # the dashboard is still starting
                return False
        assert wait_until(answers, 120, 1), "the dashboard's job API never answered with the token"
        status, body = _get(jobs, bearer)
        assert status == 200 and json.loads(body) == []
        assert _get(jobs)[0] == 401
        assert _get(jobs, {"Authorization": f"Bearer {other.read_text()}"})[0] in (401, 403)

        def job_list(token_path: Path) -> subprocess.CompletedProcess:
            return subprocess.run([ray, "job", "list", "--address", f"http://127.0.0.1:{dashboard}"],
                                  env={**env, "RAY_AUTH_TOKEN_PATH": str(token_path)}, capture_output=True,
                                  text=True, timeout=120)
        good, bad = job_list(token), job_list(other)
        assert good.returncode == 0, good.stdout[-2000:] + good.stderr[-2000:]
        assert bad.returncode != 0 and any(w in (bad.stdout + bad.stderr).lower()
                                           for w in ("401", "403", "unauthorized", "forbidden", "token")), \
            bad.stdout[-2000:] + bad.stderr[-2000:]
    finally:
        stop_ray_cluster(temp_dir=ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
