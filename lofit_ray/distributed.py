"""Phase 1 (head importance) as a Ray Train job: N data-parallel workers, DeepSpeed in each.

`phase1_train_func` is the per-worker function: it loads each requested model once,
hooks the scales A onto it, wraps A in a DeepSpeed engine (gloo on CPU, nccl on
GPU), and runs the plain-torch loop from lofit_ray.train with its share of every
batch. Several models (or several phase-1 settings) go through one job. Rank 0
returns the learned scales and head sets in a checkpoint.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

PHASE1_FILE = "phase1.json"


class DeepSpeedStepper:
    """The Stepper of lofit_ray.train backed by a DeepSpeed engine over the offsets module."""

    def __init__(self, module: torch.nn.Module, lr: float, zero_stage: int, micro_batch: int, bf16: bool = False):
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            # torch_adam avoids compiling DeepSpeed's CPU FusedAdam (~150 s).
            "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0, "torch_adam": True}},
            "zero_optimization": {"stage": zero_stage},
            "bf16": {"enabled": bf16},
            "steps_per_print": 10**9,
        }
        params = [p for p in module.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(model=module, model_parameters=params, config=config)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()


def phase1_train_func(config: dict) -> None:
    """Ray Train worker entry point. config: {"jobs": [...], "zero_stage", "deepspeed", "threads"}.

    Each job: {"model", "dtype", "task": {...}, "train_cfg": {...}, "k", "key", "reference": list | None}.
    """
    import ray.train

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(int(config.get("threads", 1)))  # oversubscribed threads make steps ~6x slower
    from .heads import HeadSet, rank_by_norm
    from .models import load_model
    from .offsets import HeadOffsets
    from .train import TorchStepper, TrainConfig, train_offsets

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = f"cuda:{ctx.get_local_rank()}" if torch.cuda.is_available() and config.get("use_gpu") else "cpu"
    outputs = []
    for job in config["jobs"]:
        loaded = load_model(job["model"], dtype=job.get("dtype", "float32"), device=device)
        examples = job_examples(job)
        cfg = TrainConfig(**job["train_cfg"])
        offsets = HeadOffsets(loaded.layout, scale=True, seed=cfg.seed).attach(loaded.model)
        if config.get("deepspeed", True):
            stepper = DeepSpeedStepper(offsets, cfg.lr, config.get("zero_stage", 2), cfg.batch_size // world,
                                       bf16=job.get("dtype") == "bfloat16")
        else:
            stepper = TorchStepper([offsets.scale], cfg.lr)
        reference = torch.tensor(job["reference"]) if job.get("reference") is not None else None
        history = train_offsets(loaded, offsets, examples, cfg, stepper=stepper, rank=rank, world=world,
                                reference=reference)
        offsets.detach()
        head_set = HeadSet(model=loaded.spec, fingerprint=loaded.fingerprint, layout=asdict(loaded.layout),
                           ranking=rank_by_norm(offsets.scale), k=job["k"], method="lofit", task=job["task"]["name"],
                           hparams={**job["train_cfg"], "phase": 1, "final_loss": history[-1]["loss"],
                                    "workers": world, "zero_stage": config.get("zero_stage")}, seed=cfg.seed)
        outputs.append({"key": job.get("key"), "head_set": json.loads(head_set.to_json()),
                        "scale": offsets.scale.detach().float().cpu().tolist(), "history": history})
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            Path(tmp, PHASE1_FILE).write_text(json.dumps(outputs))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"jobs": len(outputs)}, checkpoint=checkpoint)


def job_examples(job: dict) -> list:
    """The training examples a phase-1 job names (the same carve the trial uses)."""
    from .splits import build_splits
    from .tasks import get_task

    t = job["task"]
    task = get_task(t["name"], **t.get("kwargs", {}))
    return build_splits(task, **t["splits"]).train


def run_phase1(jobs: list[dict], *, num_workers: int, cpus_per_worker: float, use_gpu: bool, zero_stage: int,
               use_deepspeed: bool, storage_path: str, name: str, max_failures: int = 1) -> list[dict]:
    """Run phase-1 jobs on a Ray Train TorchTrainer; returns [{"key", "head_set", "scale", "history"}]."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        phase1_train_func,
        train_loop_config={"jobs": jobs, "zero_stage": zero_stage, "deepspeed": use_deepspeed, "use_gpu": use_gpu,
                           "threads": max(1, int(cpus_per_worker))},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"GPU": 1, "CPU": cpus_per_worker} if use_gpu
                                     else {"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(Path(storage_path).resolve()),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"phase-1 job {name} finished without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as directory:
        return json.loads(Path(directory, PHASE1_FILE).read_text())
