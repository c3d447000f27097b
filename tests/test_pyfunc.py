"""Adapters as MLflow 3 models: each logged adapter is a pyfunc model in the experiment's Models view,
registry versions point at it, `mlflow.pyfunc.load_model("models:/NAME@champion")` scores what
`lofit-ray eval` scores, and a missing or different base model is a clear error."""
from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch

mlflow = pytest.importorskip("mlflow")

from lofit_ray import tracking  # noqa: E402
from lofit_ray.adapter import Adapter, AdapterConfig  # noqa: E402
from lofit_ray.cli import main as cli  # noqa: E402
from lofit_ray.tasks import get_task  # noqa: E402


def random_adapter(loaded, task: str, base_model: str = "tiny-llama", fingerprint: str | None = None) -> Adapter:
    layout = dataclasses.asdict(loaded.layout)
    config = AdapterConfig(base_model=base_model, fingerprint=fingerprint or loaded.fingerprint, layout=layout,
                           heads=[[1, 2], [3, 0]], task=task, hparams={"phase2_lr": 0.01})
    g = torch.Generator().manual_seed(7)
    return Adapter(config, 0.5 * torch.randn(2, layout["head_dim"], generator=g))


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh sqlite store that MLflow's own `models:/` resolution (the global URI) reads too."""
    uri = tracking.resolve_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield uri, tracking.ensure_experiment("pyfunc", uri)
    mlflow.set_tracking_uri(previous)


def register(uri: str, experiment_id: str, adapter: Adapter, metrics: dict) -> tuple[str, str, str]:
    """One trial's record as the search writes it: adapter + model, linked metrics, a version, @champion."""
    run_id = tracking.start_run(uri, experiment_id, "trial", {"k": 2}, {})
    model_id = tracking.log_adapter(uri, run_id, adapter)
    tracking.log_metrics(uri, run_id, metrics, step=2, model_id=model_id)
    tracking.end_run(uri, run_id)
    name = tracking.registered_name(adapter.config.base_model, adapter.config.task)
    version = tracking.register_adapter(uri, name, run_id, {"k": 2})
    tracking.set_champion(uri, name, version)
    return name, version, model_id


def eval_rows(tmp_path, task: str, adapter_ref: str, limit: int) -> list[dict]:
    out = tmp_path / f"eval-{task}.json"
    assert cli(["eval", "--model", "tiny-llama", "--task", task, "--adapter", adapter_ref, "--limit", str(limit),
                "--out", str(out)]) == 0
    return [json.loads(line) for line in out.with_name(out.stem + ".items.jsonl").read_text().splitlines()]


def test_a_registered_adapter_loads_as_a_model_and_scores_like_lofit_ray_eval(tiny, store, tmp_path):
    uri, experiment_id = store
    adapter = random_adapter(tiny, "truthfulqa")
    name, version, model_id = register(uri, experiment_id, adapter, {"sel_mc2": 0.61})

    c = tracking.client(uri)
    logged = c.get_logged_model(model_id)  # the Models view: params, metrics, the run it came from
    assert logged.params["k"] == "2" and logged.params["heads"] == "L1.H2 L3.H0"
    assert logged.name == "lofit-k2-tiny-llama"  # what the Models view lists: method, K, base model
    assert [(m.key, m.value) for m in logged.metrics] == [("sel_mc2", 0.61)]
    assert c.get_model_version(name, version).source == logged.artifact_location  # the version points at it
    assert json.loads(c.get_logged_model(model_id).tags["mlflow.modelVersions"]) == [{"name": name,
                                                                                      "version": version}]

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    items = get_task("truthfulqa").eval_items(limit=4)
    frame = pd.DataFrame([{"question": i.question, "choices": i.choices, "labels": i.labels} for i in items])
    predicted = model.predict(frame).to_dict("records")

    adapter_dir = adapter.save_pretrained(tmp_path / "adapter")
    for ref in (str(adapter_dir), f"models:/{name}@champion"):  # `eval --adapter models:/...` still works
        expected = eval_rows(tmp_path, "truthfulqa", ref, 4)
        assert [r["id"] for r in predicted] == [r["id"] for r in expected]
        for got, want in zip(predicted, expected):
            assert list(got["choice_logprobs"]) == pytest.approx(want["choice_logprobs"], abs=1e-5)
            assert (got["mc1"], got["mc2"]) == pytest.approx((want["mc1"], want["mc2"]), abs=1e-6)
    unlabelled = model.predict(frame.drop(columns=["labels"]))
    assert "mc1" not in unlabelled and list(unlabelled["choice_logprobs"][0]) == \
        pytest.approx(predicted[0]["choice_logprobs"], abs=1e-6)


def test_a_generation_adapter_generates_what_eval_generates(tiny, store, tmp_path):
    uri, experiment_id = store
    name, _, _ = register(uri, experiment_id, random_adapter(tiny, "mquake"), {"sel_answer_logprob": -3.0})
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    items = get_task("mquake").eval_items(limit=3)
    predicted = model.predict(pd.DataFrame([{"prompt": i.prompt, "answers": i.answers} for i in items]))
    expected = eval_rows(tmp_path, "mquake", f"models:/{name}@champion", 3)
    assert list(predicted["generated"]) == [r["generated"] for r in expected]
    assert list(predicted["em_lenient"]) == [r["em_lenient"] for r in expected]
    assert list(model.predict(pd.DataFrame([{"prompt": items[0].prompt}])).columns) == ["id", "prompt", "generated"]


def test_a_missing_or_different_base_model_is_a_clear_error(tiny, store):
    uri, experiment_id = store
    elsewhere = random_adapter(tiny, "truthfulqa", base_model="/models/not-on-this-machine")
    name, _, _ = register(uri, experiment_id, elsewhere, {})
    with pytest.raises(Exception, match="trained on the base model '/models/not-on-this-machine', which is not "
                                        "available on this machine"):
        mlflow.pyfunc.load_model(f"models:/{name}@champion")
    other = random_adapter(tiny, "clutrr", fingerprint="0123456789ab")
    name, _, _ = register(uri, experiment_id, other, {})
    with pytest.raises(Exception, match="fingerprint .* the adapter was trained on 0123456789ab"):
        mlflow.pyfunc.load_model(f"models:/{name}@champion")
