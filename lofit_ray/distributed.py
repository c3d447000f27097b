"""Phase 1 (head importance) as a Ray Train job: N data-parallel workers, DeepSpeed in each.

`phase1_train_func` is the per-worker function: for each job it loads the model and runs
the same `selectors.select_heads` as a single process, with what the selector trains in a DeepSpeed engine
(gloo on CPU, nccl on GPU) and its share of every batch. Several models (or several phase-1
settings) go through one job. Rank 0 returns the rankings in a checkpoint.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

class DeepSpeedStepper:
    """The Stepper of lofit_ray.train backed by a DeepSpeed engine over the offsets module."""

    def __init__(self, module: torch.nn.Module, lr: float, zero_stage: int, micro_batch: int, bf16: bool = False,
                 lr_schedule: str = "constant", max_grad_norm: float = 0.0, total_steps: int = 0):
        import deepspeed

        from .train import linear_decay

        # DeepSpeed JIT-loads its CPU comm op with whichever `ninja` is first on PATH. The venv's ninja (used
        # by scripts/install.sh, which prebuilds the op) and the system's write incompatible build logs, so
        # each would rebuild the op (about 40 s) after the other: always use this environment's.
        bin_dir = os.path.dirname(sys.executable)
        if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")

        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            # torch_adam avoids compiling DeepSpeed's CPU FusedAdam (~150 s).
            "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0, "torch_adam": True}},
            "zero_optimization": {"stage": zero_stage},
            "bf16": {"enabled": bf16},
            "steps_per_print": 10**9,
            "gradient_clipping": max_grad_norm,  # 0: off, as TorchStepper
        }
        params = [p for p in module.parameters() if p.requires_grad]
        # The same schedule as TorchStepper (DeepSpeed's own WarmupDecayLR forces at least 2 warmup steps).
        schedule = (lambda optimizer: linear_decay(optimizer, total_steps)) if lr_schedule == "linear" else None
        self.engine, *_ = deepspeed.initialize(model=module, model_parameters=params, config=config,
                                               lr_scheduler=schedule)
        # ZeRO-3 leaves A partitioned (size 0) until the engine's own forward gathers it; LoFiT reads A in
        # o_proj hooks and never calls that forward. A is small, so DeepSpeed keeps it persistent once
        # gathered: gather it here.
        persistent = [p for p in module.parameters() if getattr(p, "ds_persist", False)]
        if zero_stage == 3 and persistent:
            persistent[0].all_gather(persistent)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()


def assigned_threads() -> int:
    """torch threads for the current Ray task or actor: the CPUs Ray assigned it (at least 1), so work placed
    side by side by Ray never runs more threads than the cores it was given."""
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


class Outbox:
    """A Ray actor that carries rank 0's results back to the driver through Ray itself, so nothing depends
    on a file one node wrote being readable on another (Ray Train checkpoints would need shared storage)."""

    def __init__(self):
        self.value = None

    def put(self, value) -> None:
        self.value = value

    def get(self):
        return self.value


def phase1_train_func(config: dict) -> None:
    """Ray Train worker entry point. config: {"jobs": [...], "outbox", "zero_stage", "deepspeed",
    "use_gpu"}.

    Each job (search.phase1_job): {"model", "dtype", "task": {...}, "training": {...}, "phase1": {...}, "key",
    "reference": list | None}. Rank 0 puts each job's ranking (HeadSet JSON) and loss history in the outbox.
    """
    import ray.train

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(assigned_threads())  # oversubscribed threads make steps ~6x slower
    from .config import Phase1Config, TrainingConfig
    from .models import load_model
    from .selectors import select_heads
    from .train import total_steps

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = f"cuda:{ctx.get_local_rank()}" if torch.cuda.is_available() and config.get("use_gpu") else "cpu"
    outputs = []
    for job in config["jobs"]:
        loaded = load_model(job["model"], dtype=job.get("dtype", "float32"), device=device,
                            attn_implementation=job.get("attn_implementation", "auto"))
        training, phase1 = TrainingConfig(**job["training"]), Phase1Config(**job["phase1"])
        micro, bf16, stage = training.batch_size // world, job.get("dtype") == "bfloat16", config.get("zero_stage", 2)
        examples = job_examples(job)
        steps = total_steps(len(examples), training, phase1.epochs)
        make_stepper = (lambda offsets: DeepSpeedStepper(offsets, phase1.lr, stage, micro, bf16=bf16,
                                                         lr_schedule=phase1.lr_schedule,
                                                         max_grad_norm=phase1.max_grad_norm, total_steps=steps)) \
            if config.get("deepspeed", True) else None
        reference = torch.tensor(job["reference"]) if job.get("reference") is not None else None
        head_set = select_heads(loaded, examples, training, phase1, task=job["task_name"],
                                make_stepper=make_stepper, rank=rank, world=world, reference=reference)
        head_set.hparams.update(workers=world, zero_stage=config.get("zero_stage"))
        outputs.append({"key": job.get("key"), "head_set": json.loads(head_set.to_json()),
                        "history": head_set.hparams["history"]})
    if rank == 0:
        import ray

        ray.get(config["outbox"].put.remote(outputs))


def job_examples(job: dict) -> list:
    """The training examples a phase-1 job names (the same carve the trial uses)."""
    from .split_specs import splits_from_spec

    return splits_from_spec(job["task"])[1].train


def run_phase1(jobs: list[dict], *, num_workers: int, cpus_per_worker: float, use_gpu: bool, zero_stage: int,
               worker_resources: dict | None = None,
               use_deepspeed: bool, storage_path: str, name: str, max_failures: int = 1) -> list[dict]:
    """Run phase-1 jobs on a Ray Train TorchTrainer; returns [{"key", "head_set", "history"}]."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # on this process's node: a worker node lost mid-phase-1 must not take the results' carrier with it
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    outbox = ray.remote(num_cpus=0)(Outbox).options(scheduling_strategy=here).remote()
    trainer = TorchTrainer(
        phase1_train_func,
        train_loop_config={"jobs": jobs, "outbox": outbox, "zero_stage": zero_stage, "deepspeed": use_deepspeed,
                           "use_gpu": use_gpu},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {}),
                                                           **(worker_resources or {})}),
        run_config=RunConfig(name=name, storage_path=str(Path(storage_path).resolve()),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    try:
        result = trainer.fit()
        outputs = ray.get(outbox.get.remote())
    finally:
        ray.kill(outbox)
    if outputs is None:
        raise RuntimeError(f"phase-1 job {name} returned no rankings: {result.error}")
    return outputs
