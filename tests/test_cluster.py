"""The search on a two-node Ray cluster with a real MLflow tracking server (issue "Survive what clusters do").

Both nodes run on this machine (`ray start --head` + `ray start --address`), the MLflow server is a separate
`mlflow server` process, and the search driver runs in an empty directory that reaches the server only over
HTTP. Phase-1 Ray Train workers are pinned to the second node through `scaling.worker_resources`. That node is
lost during phase 1: a worker holds at the fault point worker.hold, every process of its node is SIGKILLed,
and a replacement node joins; Ray Train's failure handling restarts phase 1 there.

Every process started here is stopped here, by pid: the Ray processes are those whose environment carries this
test's own RAY_TMPDIR (never `ray stop`, which stops every cluster on the machine), the MLflow server is its own
process group. The cluster uses a private auth token (RAY_AUTH_TOKEN_PATH), never the user's ~/.ray/auth_token.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import SESSION_ROOT
from mlflow_server import MlflowServer
from ray_util import free_port, terminate, wait_until

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
NODE_LOG = Path(os.environ.get("LOFIT_TWO_NODE_LOG") or SESSION_ROOT / "two_node_log.txt")  # kept: set the var
RAY = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(900)]


# -- process bookkeeping ------------------------------------------------------------------------------

def _marked(marker: str) -> list:
    """Live processes whose environment carries RAY_TMPDIR == marker (this test's Ray nodes and their workers)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get("RAY_TMPDIR") == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _node_processes(daemons: list[int]) -> list:
    """A node's daemons (as `ray start` left them) and every process they started since (its Ray workers)."""
    found = {}
    for pid in daemons:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            found[pid] = proc
            found.update((child.pid, child) for child in proc.children(recursive=True))
    return list(found.values())


# -- Ray state, read in a child process (keeps this process free of Ray's global auth/driver state) -------

_STATE_SCRIPT = r"""
import json, sys, time
from ray.util.state import list_actors, list_jobs, list_nodes, list_workers

address, mode = sys.argv[1], sys.argv[2]

def nodes():
    return [{"node_id": n.node_id, "ip": n.node_ip, "is_head": bool(n.is_head_node), "state": n.state,
             "resources": {k: v for k, v in (n.resources_total or {}).items() if not k.startswith(("node:", "memory", "object_store"))}}
            for n in list_nodes(address=address, detail=True, limit=100)]

if mode == "wait":  # until two nodes are ALIVE
    deadline = time.time() + float(sys.argv[3])
    while True:
        try:
            alive = [n for n in nodes() if n["state"] == "ALIVE"]
        except Exception as exc:  # the dashboard is still starting
            alive, err = [], exc
        if len(alive) >= 2 or time.time() > deadline:
            print(json.dumps(alive)); sys.exit(0 if len(alive) >= 2 else 1)
        time.sleep(1)

actors = [{"class": a.class_name, "job_id": a.job_id, "node_id": a.node_id, "pid": a.pid, "state": a.state, "name": a.name,
           "resources": a.required_resources}
          for a in list_actors(address=address, detail=True, limit=10000)]
jobs = []
for j in list_jobs(address=address):
    j = j if isinstance(j, dict) else vars(j)
    info = j.get("driver_info")
    info = info if isinstance(info, dict) or info is None else vars(info)
    jobs.append({"job_id": j.get("job_id"), "type": str(j.get("type")), "status": str(j.get("status")),
                 "driver_node_id": j.get("driver_node_id"), "driver_pid": (info or {}).get("pid"),
                 "driver_ip": (info or {}).get("node_ip_address")})
drivers = [{"pid": w.pid, "node_id": w.node_id, "ip": w.ip, "alive": w.is_alive}
           for w in list_workers(address=address, filters=[("worker_type", "=", "DRIVER")], detail=True, limit=1000)]
print(json.dumps({"nodes": nodes(), "actors": actors, "jobs": jobs, "drivers": drivers}, default=str))
"""


def _ray_state(env: dict, address: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _STATE_SCRIPT, address, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


# -- fixtures ------------------------------------------------------------------------------------------

@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1; started here, waited for in the test (about 40 s, overlapping the
    Ray start), stopped with its process group."""
    server, started = MlflowServer(tmp_path / "server"), time.time()
    try:
        yield {"url": server.url, "root": server.root, "artifacts": server.artifacts, "pid": server.pid,
               "wait": server.wait_healthy, "started": started}
    finally:
        server.stop()


@pytest.fixture
def two_node_ray(tmp_path):
    """A head node (2 CPUs, resource `driver`) and a worker node (2 CPUs, resource `phase1`) on 127.0.0.1,
    with a private auth token. Yields the address, the env every client needs, and each node's pids."""
    marker = tempfile.mkdtemp(prefix="lc-", dir="/tmp")  # short: Ray's socket paths must fit 107 characters
    secret = tmp_path / "ray-secret"
    secret.mkdir(mode=0o700)
    token_path = secret / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    home = tmp_path / "lofit_home"  # LOFIT_HOME: Tune state and the like, not the driver's cwd
    home.mkdir()
    fired = tmp_path / "faults"  # worker.hold fires once: a restarted phase-1 worker runs past it
    fired.mkdir()
    env = {**os.environ, "RAY_TMPDIR": marker, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
           "LOFIT_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true", "DS_ACCELERATOR": "cpu",
           "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0",
           # the workers a node's raylet starts inherit its env: phase-1 rank 1 holds after its first epoch
           "LOFIT_FAULTS": "worker.hold@rank=1&epoch=1", "LOFIT_FAULTS_ONCE_DIR": str(fired)}
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    port, dashboard = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    # Ray resolves 127.0.0.1 to this host's address (services.resolve_ip_for_localhost): both nodes report that IP
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--object-store-memory", str(200 * 2**20),
              "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats"]
    head = [RAY, "start", "--head", "--port", str(port), *common, "--resources", json.dumps({"driver": 1}),
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
            "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port())]
    def worker():
        return [RAY, "start", "--address", address, *common, "--resources", json.dumps({"phase1": 2}),
                "--dashboard-agent-listen-port", str(free_port())]
    pids: dict[str, list[int]] = {}

    def start(role, cmd):
        before = {p.pid for p in _marked(marker)}
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, f"ray start ({role}) failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        pids[role] = sorted(p.pid for p in _marked(marker) if p.pid not in before)
    try:
        for role, cmd in (("head", head), ("worker", worker())):
            start(role, cmd)
        waited = _ray_state(env, address, "wait", "90")
        assert waited.returncode == 0, f"two nodes never became ALIVE: {waited.stdout[-1500:]} {waited.stderr[-1500:]}"
        alive = json.loads(waited.stdout)
        nodes = {("head" if n["is_head"] else "worker"): n for n in alive}
        assert nodes["head"]["resources"].get("driver") == 1 and nodes["worker"]["resources"].get("phase1") == 2
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dashboard}", "env": env, "home": home,
               "marker": marker, "pids": pids, "nodes": nodes, "fired": fired,
               "start_replacement": lambda: start("replacement", worker())}
    finally:
        # only this cluster's processes: the node daemons recorded above and every worker they spawned since
        stopped = sorted(p.pid for p in _marked(marker))
        terminate(_marked(marker))
        # a raylet may fork a worker while it dies: sweep those too, without grace
        for _ in range(3):
            late = _marked(marker)
            if not late:
                break
            stopped += [p.pid for p in late]
            terminate(late, grace=0)
        left = [p.pid for p in _marked(marker)]
        shutil.rmtree(marker, ignore_errors=True)
        assert not left, f"Ray processes still alive after the teardown: {left} (stopped {stopped})"


# -- the test ------------------------------------------------------------------------------------------

def test_two_node_search_with_a_tracking_server(mlflow_server, two_node_ray, tmp_path, monkeypatch):
    """The smoke search as a driver in an empty directory, RAY_ADDRESS at a two-node cluster, MLflow only over
    HTTP: it exits 0; trials, the phase-1 memo run, the versions and the champion are on the server; the
    champion downloads over HTTP and loads; the phase-1 Ray Train workers ran on the second node (Ray's own
    record of each RayTrainWorker actor's node); the driver's directory stays empty."""
    import torch

    from lofit_ray import Adapter, tracking

    mlflow_server["wait"]()
    url, env, home = mlflow_server["url"], two_node_ray["env"], two_node_ray["home"]
    ready_s = time.time() - mlflow_server["started"]  # both services, started side by side
    cwd = tmp_path / "driver"  # fresh and empty: neither the server's artifacts nor any mlflow.db are here
    cwd.mkdir()
    cmd = [sys.executable, str(REPO / "jobs" / "search.py"), "--config", str(SMOKE), "--tracking-uri", url,
           "--set", "search.num_trials=2", "--set", "search.asha=false",
           "--set", "scaling.worker_resources={phase1: 0.5}"]
    t0 = time.time()
    logs = tmp_path / "driver.out", tmp_path / "driver.err"  # files: nothing blocks on a full pipe meanwhile
    with open(logs[0], "w") as stdout, open(logs[1], "w") as stderr:
        driver = subprocess.Popen(cmd, env={**env, "RAY_ADDRESS": two_node_ray["address"]}, cwd=cwd, text=True,
                                  stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        # phase 1's rank 1 holds at worker.hold after its first epoch; then its whole node is lost at once
        held = two_node_ray["fired"] / "worker.hold-epoch=1-rank=1"
        assert wait_until(lambda: driver.poll() is not None or (held.is_file() and held.read_text().strip()), 420), \
            "phase 1 never reached the fault point worker.hold"
        assert driver.poll() is None, f"the search ended before phase 1 held:\n{logs[1].read_text()[-3000:]}"
        victim = int(held.read_text())
        lost = _node_processes(two_node_ray["pids"]["worker"])
        assert victim in {p.pid for p in lost}, "the held phase-1 worker is not on the worker node"
        killed_s = time.time() - t0
        for proc in lost:
            with contextlib.suppress(psutil.Error):
                proc.kill()  # SIGKILL: the node is gone, nothing of it cleans up
        assert not psutil.wait_procs(lost, timeout=30)[1], "processes of the lost node survived SIGKILL"
        two_node_ray["start_replacement"]()  # a node with the same resources joins (as an autoscaler's would)
        driver.wait(timeout=600)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        raise
    out, err = logs[0].read_text(), logs[1].read_text()
    search_s = time.time() - t0
    assert driver.returncode == 0, f"search exited {driver.returncode}:\n{out[-3000:]}\n{err[-4000:]}"

    # -- where things ran, from Ray's own records (actors keep their node id after they die) --
    state = _ray_state(env, two_node_ray["address"], "dump")
    assert state.returncode == 0, state.stderr[-3000:]
    state = json.loads(state.stdout)
    nodes = {n["node_id"]: n for n in state["nodes"]}
    head_id, worker_id = two_node_ray["nodes"]["head"]["node_id"], two_node_ray["nodes"]["worker"]["node_id"]
    replacement = [n["node_id"] for n in state["nodes"] if n["node_id"] not in (head_id, worker_id)
                   and n["state"] == "ALIVE"]
    assert len(replacement) == 1, state["nodes"]
    role = {head_id: "head", worker_id: "worker", replacement[0]: "replacement"}
    ours = [j for j in state["jobs"] if str(j["driver_pid"]) == str(driver.pid)]
    job_ids = {j["job_id"] for j in ours}
    # every actor of this cluster belongs to the search (the fixture's state queries start no job)
    actors = [a for a in state["actors"] if not job_ids or a["job_id"] in job_ids]
    train_workers = [a for a in actors if a["class"] == "RayTrainWorker"]
    # the records on the server (read here so the log can name the trials; checked below)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # download_adapter sets it globally; restored afterwards
    import mlflow.tracking._tracking_service.utils as mlflow_uri

    monkeypatch.setattr(mlflow_uri, "_tracking_uri", mlflow_uri._tracking_uri)
    c = tracking.client(url)
    exp = c.get_experiment_by_name("lofit-smoke")
    runs = c.search_runs([exp.experiment_id], max_results=1000) if exp is not None else []
    by_kind: dict[str, list] = {}
    for r in runs:
        by_kind.setdefault(r.data.tags.get("lofit.kind"), []).append(r)
    trial_actors = [a for a in actors if a["class"] == "ImplicitFunc"]  # Tune's actor for a function trainable
    lines = [f"two-node smoke search: ray {_version('ray')}, mlflow {_version('mlflow')}; cluster+server ready "
             f"{ready_s:.0f} s, search {search_s:.0f} s, exit {driver.returncode}",
             f"worker node lost at {killed_s:.0f} s: phase-1 rank 1 (pid {victim}) held at worker.hold after epoch 1; "
             f"SIGKILLed {len(lost)} processes of that node, then a replacement node joined",
             f"MLflow server {url} (pid {mlflow_server['pid']}), artifacts {mlflow_server['artifacts']}"]
    for rid, name in ((head_id, "head"), (worker_id, "worker"), (replacement[0], "replacement")):
        n = nodes.get(rid) or two_node_ray["nodes"][name]
        lines.append(f"node {name:6s} {rid[:16]} ip {n['ip']} resources {n['resources']} "
                     f"(ray start pids {two_node_ray['pids'][name]})")
    drivers = [d for d in state["drivers"] if str(d["pid"]) == str(driver.pid)]
    for d in drivers:
        lines.append(f"driver  jobs/search.py pid {d['pid']} job {','.join(sorted(job_ids))} on "
                     f"{role.get(d['node_id'], d['node_id'])}")
    lines.append(f"trials  {sorted(r.info.run_name for r in by_kind.get('trial', []))} ran in Tune actor(s) "
                 + ", ".join(f"ImplicitFunc pid {a['pid']} on {role.get(a['node_id'], a['node_id'])}"
                             for a in trial_actors) + " (actors are reused across trials)")
    lines.append(f"phase 1 {[r.info.run_name for r in by_kind.get('phase1', [])]} computed by the RayTrainWorkers")
    for a in sorted(actors, key=lambda a: (a["class"], a["pid"] or 0)):
        lines.append(f"actor   {a['class']:28s} pid {a['pid']:>6} on {role.get(a['node_id'], a['node_id']):6s} "
                     f"needs {_plain(a['resources']) or '{}'}")
    log = "\n".join(lines)
    print(log)
    NODE_LOG.write_text(log + "\n")

    assert len(train_workers) >= 4, f"not two groups of phase-1 Ray Train workers recorded:\n{log}"
    # The placement check: every RayTrainWorker actor ran on a `phase1` node and asked for `phase1`: the first
    # group on the lost node, the group Ray Train restarted (FailureConfig) on its replacement.
    assert {a["node_id"] for a in train_workers} == {worker_id, replacement[0]}, log
    assert nodes.get(worker_id, {"state": "DEAD"})["state"] == "DEAD", log  # listed dead, or not at all
    with pytest.raises(psutil.NoSuchProcess):
        psutil.Process(victim)
    assert all(_plain(a["resources"]).get("phase1") == 0.5 for a in train_workers), log
    assert [d["node_id"] for d in drivers] == [head_id], log  # Ray connects a driver to the head of its host

    # -- the records, read back over HTTP from the server --
    assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:"), exp
    assert len(by_kind.get("search", [])) == 1 and by_kind["search"][0].info.status == "FINISHED"
    parent = by_kind["search"][0]
    assert "tiny-llama.val_mc2" in parent.data.metrics
    trials_runs = by_kind.get("trial", [])
    assert len(trials_runs) == 2 and all(r.info.status == "FINISHED" for r in trials_runs), trials_runs
    assert all(r.data.tags.get(tracking.OUTCOME_TAG) == "completed" for r in trials_runs)
    assert all(r.data.metrics.get("memo_hit") == 1.0 for r in trials_runs)  # phase 1 came from the memo
    phase1_runs = by_kind.get("phase1", [])
    assert len(phase1_runs) == 1 and phase1_runs[0].info.status == "FINISHED"
    assert phase1_runs[0].data.tags.get(tracking.PHASE1_KEY_TAG)
    assert {Path(f.path).name for f in c.list_artifacts(phase1_runs[0].info.run_id, "heads")} == \
        {"head_set.json", "heatmap.png"}
    assert all(r.data.tags.get(tracking.PARENT_RUN_TAG) == parent.info.run_id for r in trials_runs + phase1_runs)

    name = tracking.registered_name("tiny-llama", "truthfulqa")
    versions = c.search_model_versions(f"name='{name}'")
    assert len(versions) == 2 and {v.run_id for v in versions} == {r.info.run_id for r in trials_runs}
    assert all(v.source.startswith("mlflow-artifacts:") for v in versions), [v.source for v in versions]
    champion = tracking.get_champion(url, name)
    best = min(versions, key=lambda v: (-float(v.tags["sel_metric"]), int(v.version)))  # a tie: the earlier one
    assert champion is not None and str(champion.version) == str(best.version)

    # -- the champion over HTTP: downloads into a fresh directory and changes the model --
    local = tracking.download_adapter(f"models:/{name}@champion", url, dst_path=tmp_path / "download")
    adapter = Adapter.from_pretrained(local)
    assert len(adapter.config.heads) == int(champion.tags["k"])
    from lofit_ray.models import load_model

    loaded = load_model("tiny-llama")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    base = loaded.model(ids).logits
    adapter.attach(loaded.model, loaded.fingerprint)
    assert not torch.allclose(loaded.model(ids).logits, base)

    # -- the artifacts went through the server into its --artifacts-destination, nowhere near the driver --
    stored = list(mlflow_server["artifacts"].rglob("offsets.safetensors"))
    assert len(stored) == 4, stored  # each trial's adapter twice: the run's adapter/ and its MLflow model's
    assert sum("/models/" in str(p) for p in stored) == 2, stored
    assert sorted(p.name for p in cwd.iterdir()) == [], f"the driver wrote into its cwd: {list(cwd.rglob('*'))}"
    assert not list(home.rglob("mlflow.db")) and not list(home.rglob("mlruns")) and not list(home.rglob("mlartifacts"))


def _plain(resources: dict) -> dict:
    """An actor's resources without placement-group decoration: {"phase1_group_0_<pg>": 0.5, ...} -> {"phase1": 0.5}."""
    import re

    plain = {}
    for key, value in (resources or {}).items():
        name = re.sub(r"_group(_\d+)?_[0-9a-f]+$", "", key)
        if name != "bundle":
            plain[name] = value
    return plain


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
