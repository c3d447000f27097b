"""lofit_ray.tracking and `lofit-ray heads` against real MLflow stores (sqlite, and one real server)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from dataclasses import asdict
from pathlib import Path

import pytest
from mlflow_server import MlflowServer

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

torch = pytest.importorskip("torch")
pytest.importorskip("mlflow")

from lofit_ray import tracking  # noqa: E402
from lofit_ray.adapter import Adapter, AdapterConfig  # noqa: E402
from lofit_ray.heads import HeadSet, jaccard  # noqa: E402

LAYOUT = {"model_type": "llama", "num_layers": 4, "num_heads": 4, "head_dim": 16}
WIDE = {"model_type": "llama", "num_layers": 6, "num_heads": 8, "head_dim": 16}


def make_head_set(seed: int = 0, layout: dict = LAYOUT, task: str = "truthfulqa", model: str = "tiny-llama",
                  k: int = 3, method: str = "lofit") -> HeadSet:
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(layout["num_layers"], layout["num_heads"], generator=g)
    ranking = sorted(([l, h, float(scores[l, h])] for l in range(layout["num_layers"])
                      for h in range(layout["num_heads"])), key=lambda r: -r[2])
    return HeadSet(model=model, fingerprint="abc", layout=dict(layout), ranking=ranking, k=k, method=method,
                   task=task, hparams={"lr": 5e-3, "l1": 5e-4}, seed=seed)


def make_adapter(head_set: HeadSet, seed: int = 0) -> Adapter:
    g = torch.Generator().manual_seed(100 + seed)
    config = AdapterConfig(base_model=head_set.model, fingerprint=head_set.fingerprint, layout=dict(head_set.layout),
                           heads=[list(h) for h in head_set.top()], task=head_set.task, method=head_set.method,
                           head_set={"method": head_set.method, "task": head_set.task, "seed": head_set.seed,
                                     "k": head_set.k},
                           hparams={"lr": 1e-2, "final_loss": 0.5})
    return Adapter(config, torch.randn(len(config.heads), head_set.layout["head_dim"], generator=g))


def run_cli(argv: list[str]) -> int:
    from lofit_ray import cli

    return cli.main(argv)


# -- a store shared by the tests of this module ------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store holding: a parent run; two FINISHED children with head sets (seeds 0, 1) and
    adapters registered as versions 1 and 2 of one model; one run of another shape (6x8)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = tracking.resolve_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    exp = tracking.ensure_experiment("lofit-test", uri)
    name = tracking.registered_name("tiny-llama", "truthfulqa")
    parent = tracking.start_run(uri, exp, "search", {"model": "tiny-llama"}, {"lofit.role": "search"})
    children, sets, adapters, versions = [], [], [], []
    for seed in (0, 1):
        hs = make_head_set(seed)
        ad = make_adapter(hs, seed)
        rid = tracking.start_run(uri, exp, f"trial-{seed}", {"seed": seed, "train": {"lr": 1e-2}},
                                 {"lofit.role": "trial"}, parent_run_id=parent)
        tracking.log_head_set(uri, rid, hs, key=f"key-{seed}")
        tracking.log_adapter(uri, rid, ad)
        tracking.log_metrics(uri, rid, {"val_mc1": 0.25 + 0.1 * seed, "val_mc2": 0.5 + 0.01 * seed,
                                        "sel_metric": 0.5 + 0.01 * seed})
        tracking.end_run(uri, rid)
        versions.append(tracking.register_adapter(uri, name, rid, {"seed": seed, "val_mc1": 0.25 + 0.1 * seed}))
        children.append(rid)
        sets.append(hs)
        adapters.append(ad)
    wide = make_head_set(7, layout=WIDE, model="tiny-wide", task="mquake", k=5)
    wide_run = tracking.start_run(uri, exp, "wide", {}, {}, parent_run_id=None)
    tracking.log_head_set(uri, wide_run, wide)
    tracking.end_run(uri, wide_run)
    tracking.set_champion(uri, name, versions[0])
    return {"uri": uri, "root": root, "exp": exp, "name": name, "parent": parent, "children": children,
            "sets": sets, "adapters": adapters, "versions": versions, "wide_run": wide_run, "wide": wide}


# -- URIs and experiments ----------------------------------------------------------------------------

def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOFIT_HOME", str(tmp_path / "home"))
    assert tracking.resolve_tracking_uri() == f"sqlite:///{(tmp_path / 'home').resolve() / 'mlflow.db'}"
    assert tracking.resolve_tracking_uri("sqlite:///rel/x.db") == f"sqlite:///{tmp_path.resolve() / 'rel/x.db'}"
    assert tracking.resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path}/env.db"
    import mlflow

    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/env.db"


def test_experiment_artifacts_beside_the_db(store, tmp_path, monkeypatch):
    c = tracking.client(store["uri"])
    exp = c.get_experiment(store["exp"])
    assert exp.artifact_location == (store["root"] / "mlartifacts" / "lofit-test").resolve().as_uri()
    assert tracking.ensure_experiment("lofit-test", store["uri"]) == store["exp"]  # idempotent
    # artifacts never land in the cwd of whoever logs them
    monkeypatch.chdir(tmp_path)
    rid = tracking.start_run(store["uri"], store["exp"], "cwd-check", {}, {})
    tracking.log_head_set(store["uri"], rid, make_head_set(3))
    tracking.end_run(store["uri"], rid)
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()
    assert (store["root"] / "mlartifacts" / "lofit-test" / rid / "artifacts" / "heads" / "head_set.json").is_file()
    explicit = tracking.ensure_experiment("explicit-root", store["uri"], artifact_root=str(tmp_path / "arts"))
    assert c.get_experiment(explicit).artifact_location == (tmp_path / "arts").resolve().as_uri()


# -- runs --------------------------------------------------------------------------------------------

def test_runs_params_tags_metrics_and_status(store):
    uri, c = store["uri"], tracking.client(store["uri"])
    parent = tracking.start_run(uri, store["exp"], "p", {"cfg": {"phase1": {"lr": 5e-3}, "k": [8, 16]},
                                                         "long": "x" * 7000, "none": None},
                                {"lofit.role": "search", "big": "y" * 9000})
    child = tracking.start_run(uri, store["exp"], "c", {"seed": 1}, {"lofit.role": "trial"}, parent_run_id=parent)
    for step, value in enumerate((0.1, 0.2, 0.3)):
        tracking.log_metrics(uri, child, {"val_mc1": value, "skipped": None, "text": "n/a", "ok": True}, step=step)
    tracking.end_run(uri, child, "FAILED", reason="NaN loss in epoch 2")

    p = c.get_run(parent)
    assert p.info.status == "RUNNING" and p.info.run_name == "p"
    assert p.data.params["cfg.phase1.lr"] == "0.005" and json.loads(p.data.params["cfg.k"]) == [8, 16]
    assert p.data.params["none"] == "None"
    assert len(p.data.params["long"]) == 6000 and p.data.params["long"].endswith("[truncated]")
    assert len(p.data.tags["big"]) == 8000 and p.data.tags["lofit.role"] == "search"
    ch = c.get_run(child)
    assert ch.data.tags["mlflow.parentRunId"] == parent
    assert ch.info.status == "FAILED" and ch.data.tags[tracking.FAILURE_REASON_TAG] == "NaN loss in epoch 2"
    assert [(m.step, m.value) for m in c.get_metric_history(child, "val_mc1")] == [(0, 0.1), (1, 0.2), (2, 0.3)]
    assert ch.data.metrics["ok"] == 1.0 and "skipped" not in ch.data.metrics and "text" not in ch.data.metrics
    tracking.end_run(uri, parent, "KILLED")
    assert c.get_run(parent).info.status == "KILLED"
    with pytest.raises(ValueError, match="FINISHED"):
        tracking.end_run(uri, parent, "DONE")


def test_close_dangling_runs(store):
    uri, exp, c = store["uri"], store["exp"], tracking.client(store["uri"])
    parent = tracking.start_run(uri, exp, "driver", {}, {})
    done = tracking.start_run(uri, exp, "t0", {}, {}, parent_run_id=parent)
    tracking.end_run(uri, done)
    stopped = tracking.start_run(uri, exp, "t1", {}, {}, parent_run_id=parent)
    grand = tracking.start_run(uri, exp, "t1-phase1", {}, {}, parent_run_id=stopped)
    other = tracking.start_run(uri, exp, "unrelated", {}, {})
    closed = tracking.close_dangling_runs(uri, parent, "stopped by ASHA")
    assert sorted(closed) == sorted([stopped, grand])
    for rid in (stopped, grand):
        run = c.get_run(rid)
        assert run.info.status == "KILLED" and run.data.tags[tracking.FAILURE_REASON_TAG] == "stopped by ASHA"
    assert c.get_run(done).info.status == "FINISHED"
    assert c.get_run(other).info.status == "RUNNING" and c.get_run(parent).info.status == "RUNNING"
    assert tracking.close_dangling_runs(uri, parent, "again") == []


# -- head sets ---------------------------------------------------------------------------------------

def test_head_set_artifacts_round_trip(store):
    c, rid, hs = tracking.client(store["uri"]), store["children"][0], store["sets"][0]
    files = {f.path for f in c.list_artifacts(rid, "heads")}
    assert files == {"heads/head_set.json", "heads/heatmap.png"}
    png = Path(c.download_artifacts(rid, "heads/heatmap.png", dst_path=str(store["root"] / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    assert asdict(tracking.load_head_set(store["uri"], rid)) == asdict(hs)
    tags = c.get_run(rid).data.tags
    assert (tags["lofit.heads_k"], tags["lofit.model"], tags["lofit.task"], tags["lofit.method"]) == \
        ("3", "tiny-llama", "truthfulqa", "lofit")
    assert tags[tracking.PHASE1_KEY_TAG] == "key-0"


def test_log_head_set_with_k(store):
    uri = store["uri"]
    rid = tracking.start_run(uri, store["exp"], "k5", {}, {})
    tracking.log_head_set(uri, rid, store["sets"][0], k=5)
    tracking.end_run(uri, rid)
    loaded = tracking.load_head_set(uri, f"runs:/{rid}")
    assert loaded.k == 5 and loaded.ranking == store["sets"][0].ranking
    assert tracking.client(uri).get_run(rid).data.tags["lofit.heads_k"] == "5"


def test_find_head_set_memo(store):
    uri, exp = store["uri"], store["exp"]
    hit = tracking.find_head_set(uri, exp, "key-1")
    assert hit is not None and asdict(hit) == asdict(store["sets"][1])
    assert tracking.find_head_set(uri, exp, "no-such-key") is None
    # a run with the key that never finished is no memo
    rid = tracking.start_run(uri, exp, "unfinished", {}, {tracking.PHASE1_KEY_TAG: "key-running"})
    tracking.log_head_set(uri, rid, make_head_set(5))
    assert tracking.find_head_set(uri, exp, "key-running") is None
    tracking.end_run(uri, rid)
    assert tracking.find_head_set(uri, exp, "key-running").seed == 5


def test_load_head_set_refs(store, tmp_path):
    uri, name = store["uri"], store["name"]
    assert asdict(tracking.load_head_set(uri, f"models:/{name}/2")) == asdict(store["sets"][1])
    path = tmp_path / "hs.json"
    store["sets"][1].to_json(path)
    assert asdict(tracking.load_head_set(uri, str(path))) == asdict(store["sets"][1])
    with pytest.raises(ValueError, match="heads list"):
        tracking.load_head_set(uri, "0" * 32)
    with pytest.raises(ValueError, match="no version 99"):
        tracking.load_head_set(uri, f"models:/{name}/99")


# -- adapters and the registry -----------------------------------------------------------------------

def test_registered_name():
    assert tracking.registered_name("smollm2-135m", "truthfulqa") == "lofit-smollm2-135m-truthfulqa"
    assert tracking.registered_name("/models/SmolLM2-135M-Instruct.Q8_0.gguf", "mquake") == \
        "lofit-smollm2-135m-instruct-q8-0-mquake"
    assert tracking.registered_name("./ckpt/gemma3_270m/", "clutrr") == "lofit-gemma3-270m-clutrr"
    assert tracking.registered_name("HuggingFaceTB/SmolLM2-135M", "") == "lofit-smollm2-135m"


def test_adapter_logged_and_registered(store):
    c, name = tracking.client(store["uri"]), store["name"]
    assert store["versions"] == ["1", "2"]
    for version, rid, seed in zip(store["versions"], store["children"], (0, 1)):
        mv = c.get_model_version(name, version)
        model_id = c.get_run(rid).data.tags[tracking.MODEL_ID_TAG]  # the adapter as an MLflow model
        assert mv.run_id == rid and mv.source == c.get_logged_model(model_id).artifact_location
        assert c.get_logged_model(model_id).source_run_id == rid
        assert mv.tags["seed"] == str(seed) and float(mv.tags["val_mc1"]) == pytest.approx(0.25 + 0.1 * seed)
    files = {f.path for f in c.list_artifacts(store["children"][0], "adapter")}
    assert files == {"adapter/adapter_config.json", "adapter/offsets.safetensors"}
    no_adapter = tracking.start_run(store["uri"], store["exp"], "no-adapter", {}, {})
    with pytest.raises(ValueError, match="log_adapter"):
        tracking.register_adapter(store["uri"], name, no_adapter, {})


def test_download_adapter_from_registry(store, tmp_path):
    uri, name = store["uri"], store["name"]
    tracking.set_champion(uri, name, "1")
    champion = tracking.get_champion(uri, name)
    assert str(champion.version) == "1" and champion.run_id == store["children"][0]
    for ref, expected in ((f"models:/{name}@champion", 0), (f"models:/{name}/2", 1),
                          (f"runs:/{store['children'][1]}/adapter", 1), (f"runs:/{store['children'][0]}", 0)):
        local = tracking.download_adapter(ref, uri)
        assert (local / "adapter_config.json").is_file()
        adapter, original = Adapter.from_pretrained(local), store["adapters"][expected]
        assert torch.equal(adapter.offset, original.offset), ref
        assert asdict(adapter.config) == asdict(original.config), ref
    with pytest.raises(ValueError, match="promote"):
        tracking.download_adapter(f"models:/{name}@staging", uri)
    with pytest.raises(ValueError, match="no registered model"):
        tracking.download_adapter("models:/lofit-nope@champion", uri)
    # cli.resolve_adapter goes through $MLFLOW_TRACKING_URI
    from lofit_ray.cli.common import resolve_adapter

    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        assert torch.equal(resolve_adapter(f"models:/{name}@champion").offset, store["adapters"][0].offset)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def test_list_head_sets(store):
    rows = tracking.list_head_sets(store["uri"], "lofit-test", "tiny-llama", "truthfulqa")
    by_run = {r["run_id"]: r for r in rows}
    assert set(store["children"]) <= set(by_run)
    first = by_run[store["children"][0]]
    assert (first["model"], first["task"], first["method"], first["k"]) == ("tiny-llama", "truthfulqa", "lofit", 3)
    assert first["metrics"]["val_mc1"] == pytest.approx(0.25) and first["parent_run_id"] == store["parent"]
    assert first["registered"][0]["name"] == store["name"] and first["registered"][0]["version"] == "1"
    assert all(r["model"] == "tiny-llama" for r in rows)
    assert [r["run_id"] for r in tracking.list_head_sets(store["uri"], None, "tiny-wide", None)] == [store["wide_run"]]
    with pytest.raises(ValueError, match="--experiment"):
        tracking.list_head_sets(store["uri"], "no-such-experiment", None, None)


# -- `lofit-ray heads` -------------------------------------------------------------------------------

def test_cli_heads_list(store, capsys):
    uri, name = store["uri"], store["name"]
    tracking.set_champion(uri, name, "1")
    assert run_cli(["heads", "list", "--tracking-uri", uri, "--experiment", "lofit-test", "--task", "truthfulqa"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:7] == ["RUN", "VERSION", "KIND", "MODEL", "TASK", "METHOD", "K"] and "val_mc1" in out[0]
    line0 = next(line for line in out if line.startswith(store["children"][0]))
    line1 = next(line for line in out if line.startswith(store["children"][1]))
    assert f"{name}/1" in line0 and line0.rstrip().endswith("*") and "0.250" in line0
    assert f"{name}/2" in line1 and not line1.rstrip().endswith("*") and "0.350" in line1
    assert "champion: " + f"{name}/1" in out[-1] and "head sets" in out[-1]


def test_cli_heads_list_puts_phase1_rankings_apart_with_their_settings(store, capsys):
    uri = store["uri"]
    exp = tracking.ensure_experiment("lofit-rankings", uri)
    rid = tracking.start_run(uri, exp, "phase1-tiny", {"phase1": {"selector": "gates", "l1": 0.002, "lr": 0.01,
                                                                   "epochs": 2}}, {"lofit.kind": "phase1"})
    tracking.log_head_set(uri, rid, make_head_set(3))
    tracking.end_run(uri, rid)
    assert run_cli(["heads", "list", "--tracking-uri", uri, "--experiment", "lofit-rankings"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = out.index(next(line for line in out if line.startswith("phase-1 rankings"))) + 1
    assert out[header].split() == ["RUN", "MODEL", "TASK", "SELECTOR", "L1", "LR", "EPOCHS", "STATUS"]
    assert out[header + 1].split() == [rid, "tiny-llama", "truthfulqa", "gates", "0.002", "0.01", "2", "FINISHED"]
    assert "0 head sets and 1 ranking" in out[-1]


def test_cli_heads_show(store, capsys):
    hs = store["sets"][0]
    assert run_cli(["heads", "show", f"models:/{store['name']}@champion", "--tracking-uri", store["uri"]]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "tiny-llama" in lines[0] and "K=3 of 16 heads" in lines[0]
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [(int(r[1]), int(r[2])) for r in rows[:3]] == hs.top()
    assert all(r[-1] == "*" for r in rows[:3]) and all(len(r) == 4 for r in rows[3:10])
    assert "per-layer count of the top 3" in out and "#" in out
    assert lines[-1].startswith("top 3 heads span")
    assert run_cli(["heads", "show", store["children"][1], "--tracking-uri", store["uri"], "--k", "5",
                    "--limit", "0"]) == 0
    out = capsys.readouterr().out
    assert sum(1 for line in out.splitlines() if line.rstrip().endswith("*")) == 5
    assert sum(1 for line in out.splitlines() if line.split() and line.split()[0].isdigit()) == 16


def test_cli_heads_compare(store, capsys):
    a, b = store["children"]
    assert run_cli(["heads", "overlap", a, b, "--tracking-uri", store["uri"]]) == 0
    out = capsys.readouterr().out
    expected = jaccard(store["sets"][0], store["sets"][1])
    pair = next(line for line in out.splitlines() if line.startswith(a[:8]) and b[:8] in line)
    assert pair.split()[-1] == f"{expected:.3f}"
    assert "LAYER" in out and "mean Jaccard" in out.splitlines()[-1]
    # across tasks/methods of the same shape, with an explicit K and a models:/ ref
    other = make_head_set(11, task="clutrr", method="random")
    path = store["root"] / "clutrr.json"
    other.to_json(path)
    assert run_cli(["heads", "overlap", a, str(path), f"models:/{store['name']}/2", "--k", "4",
                    "--tracking-uri", store["uri"]]) == 0
    out = capsys.readouterr().out
    assert "K=4" in out.splitlines()[-1] and "3 pairs" in out.splitlines()[-1]


def test_cli_heads_errors(store, tmp_path, capsys):
    uri = store["uri"]
    assert run_cli(["heads", "overlap", store["children"][0], store["wide_run"], "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "different shapes" in err and "4 layers x 4 heads" in err and "6 layers x 8 heads" in err
    assert run_cli(["heads", "show", "f" * 32, "--tracking-uri", uri]) == 2
    assert "heads list" in capsys.readouterr().err
    assert run_cli(["heads", "show", store["children"][0], "--k", "99", "--tracking-uri", uri]) == 2
    assert "lower K" in capsys.readouterr().err
    assert run_cli(["heads", "promote", store["name"], "42", "--tracking-uri", uri]) == 2
    assert "no version 42" in capsys.readouterr().err
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    assert run_cli(["heads", "list", "--tracking-uri", empty]) == 2
    assert "lofit-ray search" in capsys.readouterr().err


def test_cli_heads_promote(store, capsys):
    uri, name = store["uri"], store["name"]
    tracking.set_champion(uri, name, "1")
    assert run_cli(["heads", "promote", name, "2", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"old champion: {name}/1"
    assert out[1].startswith(f"new champion: {name}/2 (run {store['children'][1]}")
    assert "val_mc1=0.350" in out[1] and out[-1].startswith(f"promoted {name}/2")
    assert str(tracking.get_champion(uri, name).version) == "2"
    local = tracking.download_adapter(f"models:/{name}@champion", uri)
    assert torch.equal(Adapter.from_pretrained(local).offset, store["adapters"][1].offset)
    assert run_cli(["heads", "promote", name, "2", "--tracking-uri", uri]) == 0
    assert "nothing changed" in capsys.readouterr().out


def test_cli_ui_links_each_experiments_trials_best_first(tmp_path):
    """`lofit-ray ui` prints, per experiment, a runs-view link listing the search's trials flat and best first;
    the link's filter and order are ones MLflow's own run search accepts and sorts by."""
    import signal
    import socket

    uri = tracking.resolve_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.ensure_experiment("lofit-ui", uri)
    parent = tracking.start_run(uri, exp, "search", {}, {"lofit.kind": "search"})
    scores = {}
    for score in (0.4, 0.6, 0.5):
        run_id = tracking.start_run(uri, exp, f"trial-{score}", {}, {"lofit.kind": "trial"}, parent_run_id=parent)
        tracking.log_metrics(uri, run_id, {"sel_metric": score})
        tracking.end_run(uri, run_id)
        scores[run_id] = score
    tracking.end_run(uri, parent)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "lofit_ray.cli", "ui", "--tracking-uri", uri, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        lines = [proc.stdout.readline().strip() for _ in range(2)]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the CLI and the MLflow server it started, nothing else
        proc.wait(timeout=60)
    assert lines[0].startswith(f"MLflow UI for {uri} at http://127.0.0.1:{port}/#/experiments?workflowType=")
    name, link = lines[1].split(": trials, best first: ")
    assert name == "lofit-ui"
    route, query = urllib.parse.urlsplit(link).fragment.split("?")
    assert route == f"/experiments/{exp}/runs"
    q = dict(urllib.parse.parse_qsl(query))
    order = f"{q['orderByKey']} {'ASC' if q['orderByAsc'] == 'true' else 'DESC'}"
    runs = tracking.client(uri).search_runs([exp], filter_string=q["searchFilter"], order_by=[order])
    assert [r.info.run_id for r in runs] == sorted(scores, key=lambda r: -scores[r])


def test_cli_heads_without_mlflow_says_which_extra(tmp_path):
    """With mlflow unimportable, `lofit-ray heads list` prints one line naming the extra and exits 2."""
    code = ("import sys\n"
            "class BlockMlflow:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'mlflow' or name.startswith('mlflow.'):\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, BlockMlflow())\n"
            "from lofit_ray.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "LOFIT_HOME": str(tmp_path)}
    for argv in (["heads", "list"], ["heads", "promote", "lofit-x", "1"], ["ui"]):
        res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                             timeout=300)
        assert res.returncode == 2, (argv, res.stderr[-2000:])
        assert res.stderr.strip() == f"lofit-ray {argv[0]} needs mlflow: pip install 'lofit-ray[service]'", argv
    assert not (tmp_path / "mlflow.db").exists()


# -- a real tracking server over REST ------------------------------------------------------------------

def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "server")
    try:
        server.wait_healthy(120)
        yield {"url": server.url, "artifacts": server.artifacts, "cwd": tmp_path}
    finally:
        server.stop()


@pytest.mark.slow
def test_rest_tracking_server(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land here
    url = mlflow_server["url"]
    uri = tracking.resolve_tracking_uri(url)
    exp = tracking.ensure_experiment("rest-test", uri)
    hs = make_head_set(2)
    rid = tracking.start_run(uri, exp, "over-rest", {"k": 3, "cfg": {"lr": 0.01}}, {"lofit.role": "trial"})
    tracking.log_metrics(uri, rid, {"val_mc1": 0.42}, step=1)
    tracking.log_head_set(uri, rid, hs, key="rest-key")
    tracking.log_adapter(uri, rid, make_adapter(hs))
    tracking.end_run(uri, rid)

    run = _get(f"{url}/api/2.0/mlflow/runs/get?run_id={rid}")["run"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["experiment_id"] == exp
    assert {m["key"]: m["value"] for m in run["data"]["metrics"]} == {"val_mc1": 0.42}
    assert {p["key"]: p["value"] for p in run["data"]["params"]} == {"k": "3", "cfg.lr": "0.01"}
    assert {t["key"]: t["value"] for t in run["data"]["tags"]}["lofit.phase1_key"] == "rest-key"
    query = urllib.parse.urlencode({"run_id": rid, "path": "heads"})
    listed = _get(f"{url}/api/2.0/mlflow/artifacts/list?{query}")
    assert {f["path"] for f in listed["files"]} == {"heads/head_set.json", "heads/heatmap.png"}
    experiments = _get(f"{url}/api/2.0/mlflow/experiments/search?max_results=100")["experiments"]
    assert "rest-test" in {e["name"] for e in experiments}

    # the files went to the server's --artifacts-destination, and read back through the client
    assert list(mlflow_server["artifacts"].rglob("head_set.json"))
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()
    assert asdict(tracking.find_head_set(uri, exp, "rest-key")) == asdict(hs)
    name = tracking.registered_name("tiny-llama", "rest")
    version = tracking.register_adapter(uri, name, rid, {"val_mc1": 0.42})
    tracking.set_champion(uri, name, version)
    local = tracking.download_adapter(f"models:/{name}@champion", uri)
    assert torch.equal(Adapter.from_pretrained(local).offset, make_adapter(hs).offset)


# -- several writers at once ---------------------------------------------------------------------------

def _register_many(uri: str, name: str, writer: int, count: int) -> list[str]:
    """One process of test_concurrent_writers_get_distinct_complete_versions: log and register `count` adapters."""
    exp = tracking.ensure_experiment("lofit-concurrent", uri)
    versions = []
    for i in range(count):
        hs = make_head_set(seed=10 * writer + i)
        rid = tracking.start_run(uri, exp, f"writer{writer}-{i}", {"writer": writer, "i": i}, {"lofit.kind": "trial"})
        tracking.log_adapter(uri, rid, make_adapter(hs, seed=10 * writer + i))
        versions.append(tracking.register_adapter(uri, name, rid, {"writer": writer, "i": i}))
        tracking.end_run(uri, rid)
    return versions


def test_concurrent_writers_get_distinct_complete_versions(tmp_path):
    """Three processes (as two searches and a CLI would) register into one model of one fresh SQLite store at
    once: every version number is distinct, and every version has its tags and its complete adapter."""
    import multiprocessing

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = "lofit-concurrent-test"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        results = pool.starmap(_register_many, [(uri, name, w, 3) for w in range(3)])
    numbers = [int(v) for vs in results for v in vs]
    assert sorted(numbers) == list(range(1, 10))
    c = tracking.client(uri)
    for v in c.search_model_versions(f"name='{name}'"):
        assert {"writer", "i"} <= set(v.tags)
        files = {Path(f.path).name for f in c.list_artifacts(v.run_id, "adapter")}
        assert files == {"adapter_config.json", "offsets.safetensors"}, files
        adapter = tracking.download_adapter(f"models:/{name}/{v.version}", uri)
        assert Adapter.from_pretrained(adapter).config.heads  # loads back whole


def test_a_half_migrated_store_is_refused_with_the_fix(tmp_path):
    """A store an interrupted migration left with an _alembic_tmp_ table is refused, naming the table and the fix;
    a fresh store is created whole (no .creating-* file is left behind)."""
    import sqlite3

    uri = f"sqlite:///{tmp_path / 'ok.db'}"
    tracking.ensure_store(uri)
    assert (tmp_path / "ok.db").is_file() and not list(tmp_path.glob(".ok.db.creating-*"))
    broken = tmp_path / "half.db"
    broken.write_bytes((tmp_path / "ok.db").read_bytes())
    with sqlite3.connect(broken) as conn:
        conn.execute("create table _alembic_tmp_experiments (id integer)")
    with pytest.raises(tracking.StoreError, match="_alembic_tmp_experiments.*mlflow db upgrade"):
        tracking.ensure_store(f"sqlite:///{broken}")


# -- evidence: champions among comparable versions, per-item records ---------------------------------

def test_champion_is_never_chosen_across_incomparable_selection_splits(tmp_path):
    """Versions scored on another selection split or metric never win, however high their score: the
    search asks only among versions carrying its own selection fingerprint."""
    from lofit_ray.splits import selection_fingerprint

    uri = tracking.resolve_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.ensure_experiment("fp", uri)
    # tagged so that MLflow 3's UI opens it as model training, not in GenAI mode
    assert tracking.client(uri).get_experiment(exp).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    name = tracking.registered_name("tiny-llama", "truthfulqa")
    ours = selection_fingerprint([{"q": i} for i in range(8)], "mc2")
    other_split = selection_fingerprint([{"q": i} for i in range(4)], "mc2")
    other_metric = selection_fingerprint([{"q": i} for i in range(8)], "score")
    assert len({ours, other_split, other_metric}) == 3
    versions = {}
    for label, fp, score in (("ours-low", ours, 0.40), ("other-split", other_split, 0.99), ("ours-high", ours, 0.45),
                             ("other-metric", other_metric, 0.90), ("untagged", None, 0.95), ("ours-tie", ours, 0.45)):
        rid = tracking.start_run(uri, exp, label, {}, {})
        tracking.log_adapter(uri, rid, make_adapter(make_head_set(0)))
        tracking.end_run(uri, rid)
        tags = {"sel_metric": score, **({tracking.SELECT_FP_TAG: fp} if fp else {})}
        versions[label] = tracking.register_adapter(uri, name, rid, tags)
    # ours-tie scores as high as ours-high, later: a tie goes to the earlier version
    assert tracking.best_version(uri, name, select_fingerprint=ours)[0] == str(versions["ours-high"])
    assert tracking.best_version(uri, name, select_fingerprint=other_split)[0] == str(versions["other-split"])
    assert tracking.best_version(uri, name, select_fingerprint="no-such-split") is None
    assert tracking.best_version(uri, name)[0] == str(versions["other-split"])  # unfiltered: what used to happen


def test_item_rows_round_trip_through_mlflow(store, tmp_path):
    rows = [{"id": f"{i}-abc", "question": f"q{i}", "choices": ["a", "b"], "labels": [1, 0],
             "choice_logprobs": [-1.0, -2.0 + i], "mc1": float(i < 1), "mc2": 0.7} for i in range(3)]
    run = tracking.start_run(store["uri"], store["exp"], "items", {}, {})
    tracking.log_item_rows(store["uri"], run, rows, "report")
    tracking.log_item_rows(store["uri"], run, rows[:2], "select")
    got, where = tracking.load_item_rows(store["uri"], f"{run}#report")
    assert got == rows and "#report" in where
    assert tracking.load_item_rows(store["uri"], run)[0] == rows  # default: report
    with pytest.raises(ValueError, match="has no record 'nope'; it has report, select"):
        tracking.load_item_rows(store["uri"], f"{run}#nope")
    with pytest.raises(ValueError, match="no per-item records"):
        tracking.load_item_rows(store["uri"], store["wide_run"])
    artifacts = {f.path for f in tracking.client(store["uri"]).list_artifacts(run, tracking.ITEMS_DIR)}
    assert f"{tracking.ITEMS_DIR}/report.table.json" in artifacts  # the MLflow table the UI shows
    table = json.loads(Path(tracking.client(store["uri"]).download_artifacts(
        run, f"{tracking.ITEMS_DIR}/report.table.json", str(tmp_path))).read_text())
    assert table["columns"][:2] == ["id", "question"] and len(table["data"]) == 3
