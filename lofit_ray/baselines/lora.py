"""LoRA (Hu et al., 2022) through peft, trained with LoFiT's own data path and losses.

Same batching (`lofit_ray.batching`), same answer-only log-likelihoods and SFT/DPO losses
(`lofit_ray.losses`), same loop (`lofit_ray.train.train_loop`: epoch order, NaN check, DPO reference) as LoFiT, so a
LoRA run differs from a LoFiT run only in what is trained. The DPO reference is the base model:
the same model with the LoRA adapter disabled (peft's `disable_adapter`), computed once
through `lofit_ray.train.reference_logprobs` (and shared with LoFiT runs through its cache).

Defaults, and why (for the 100M-300M-parameter models this project targets):
  * rank 8, alpha 16 (scale alpha/rank = 2) on q_proj, k_proj, v_proj and o_proj: all the
    attention projections, the module LoFiT itself edits. Rank 8 is a usual rank in the
    LoRA paper's ablations; alpha = 2 * rank is the common peft setting. On SmolLM2-135M this
    is 921,600 trainable parameters, some 500x LoFiT's 1,728 at K=27 heads (the LoFiT paper's
    point of comparison: far more parameters for LoRA);
  * dropout 0.0: with a few hundred training examples and a handful of epochs, dropout
    mostly slows training; with the adapter off and no dropout, the base model is exactly
    the DPO reference;
  * lr 5e-4 (CLI default), AdamW without weight decay, gradient-norm clipping at 1.0: LoRA
    wants a higher lr than full fine-tuning (1e-4-3e-4 is common for 7B models; smaller models
    take larger steps well), and clipping keeps DPO's first steps from blowing up. Not swept:
    one check on SmolLM2-135M (48 TruthfulQA DPO pairs, batch 8, 3 epochs) took the DPO loss
    from 0.67 to 0.15 without instability;
  * batch size, max length, DPO beta and seed come from `TrainingConfig`, shared with LoFiT; the rest
    (and these defaults) from `LoraConfig`.

peft is an optional dependency (`pip install lofit-ray[baselines]`); it is imported only
when a LoRA function runs.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..adapter import check_base
from ..config import LoraConfig, TrainingConfig
from ..tasks import PreferenceExample
from ..train import TorchStepper, train_loop

DEFAULT_TARGETS = tuple(LoraConfig().targets)
META_NAME = "lofit_lora.json"  # written beside peft's adapter_config.json / adapter_model.safetensors


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise ImportError("the LoRA baseline needs peft: pip install 'lofit-ray[baselines]' (or pip install peft)") from exc
    return peft


def inner_model(peft_model) -> torch.nn.Module:
    """The transformers model inside a PeftModel, its target modules LoRA-wrapped in place."""
    return peft_model.base_model.model if hasattr(peft_model, "base_model") else peft_model


def lora_loaded(loaded, peft_model):
    """A LoadedModel whose model is the LoRA-wrapped transformers model, for `evaluate(...)`."""
    return dataclasses.replace(loaded, model=inner_model(peft_model))


def evaluate_lora(loaded, peft_model, items, batch_size: int = 8, progress: bool = False,
                  rows: bool = False) -> dict:
    """`lofit_ray.evaluate.evaluate` with the LoRA adapter on; rows=True adds the per-item rows under "rows"."""
    from ..evaluate import evaluate_items

    metrics, item_rows = evaluate_items(lora_loaded(loaded, peft_model), items, batch_size=batch_size,
                                        progress=progress)
    return {**metrics, "rows": item_rows} if rows else metrics


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def wrap_lora(loaded, rank: int, alpha: float, targets: Sequence[str], dropout: float = 0.0):
    """A fresh peft model around loaded.model (which is modified in place: LoRA layers are
    injected into its target modules; `peft_model.unload()` takes them out again)."""
    peft = _peft()
    if rank < 1:
        raise ValueError(f"rank={rank} must be at least 1")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout} must be in [0, 1)")
    targets = list(targets)
    if not targets:
        raise ValueError("targets is empty; name the linear modules to adapt, e.g. q_proj v_proj")
    names = {name.rsplit(".", 1)[-1] for name, _ in loaded.model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"target module(s) {missing} not found in {loaded.spec}; "
                         f"attention projections are {', '.join(DEFAULT_TARGETS)}")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout,
                             bias="none", task_type="CAUSAL_LM")
    return peft.get_peft_model(loaded.model, config)


def train_lora(loaded, examples: list, training: TrainingConfig, lora: LoraConfig, *,
               reference: torch.Tensor | None = None, on_epoch: Callable[[int, dict], None] | None = None,
               progress: bool = False):
    """Train LoRA on SFT or DPO examples with LoFiT's own loop (`train.train_loop`): only the trainable
    differs, plus gradient clipping in the stepper.

    loaded.model gets the LoRA layers in place (see `wrap_lora`). Returns (peft_model, info):
    info = {"trainable_parameters", "total_parameters", "history" (per epoch: loss, seconds),
    "final_loss", "objective", "lora": LoraConfig fields, "training": TrainingConfig fields, "seconds"}.
    Raises NaNLossError when the loss stops being finite; whatever stops it (also an `on_epoch` that raises)
    takes the LoRA layers out again first.
    """
    if not examples:
        raise ValueError("no training examples: the training split is empty")
    start = time.time()
    torch.manual_seed(training.seed)  # LoRA A's init
    peft_model = wrap_lora(loaded, lora.rank, lora.alpha, lora.targets, lora.dropout)
    model = inner_model(peft_model)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    stepper = TorchStepper(params, lora.lr, max_grad_norm=lora.max_grad_norm)
    model.train(lora.dropout > 0)
    try:
        history = train_loop(lora_loaded(loaded, peft_model), examples, training, lora.epochs, stepper,
                             reference=reference, base_model=peft_model.disable_adapter, on_epoch=on_epoch,
                             progress=progress, label="LoRA ")
    except BaseException:
        peft_model.unload()  # a failed or stopped run leaves loaded.model as it found it
        raise
    finally:
        model.eval()
    info = {
        "trainable_parameters": count_trainable(peft_model),
        "total_parameters": sum(p.numel() for p in peft_model.parameters()),
        "history": history,
        "final_loss": history[-1]["loss"],
        "objective": "dpo" if isinstance(examples[0], PreferenceExample) else "sft",
        "lora": dataclasses.asdict(lora),
        "training": dataclasses.asdict(training),
        "seconds": round(time.time() - start, 2),
    }
    return peft_model, info


def count_lora_parameters(model: torch.nn.Module) -> int:
    """Parameters of the LoRA matrices in a peft model, trainable or not (e.g. after load_lora)."""
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)


def lora_parameter_count(model: torch.nn.Module, rank: int, targets: Sequence[str] = DEFAULT_TARGETS) -> int:
    """Analytic LoRA size: rank * (in + out) for every nn.Linear whose name ends in a target."""
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in set(targets))


def save_lora(peft_model, directory: str | Path, loaded=None, info: dict | None = None, task: str = "") -> Path:
    """peft's save_pretrained (adapter_config.json + adapter_model.safetensors) plus lofit_lora.json
    (base model spec and fingerprint, task, training info)."""
    directory = Path(directory)
    peft_model.save_pretrained(str(directory))
    meta = {"method": "lora", "task": task, "info": info or {}}
    if loaded is not None:
        meta.update(base_model=loaded.spec, fingerprint=loaded.fingerprint)
    (directory / META_NAME).write_text(json.dumps(meta, indent=1, default=str))
    return directory


def load_lora(loaded, directory: str | Path, trainable: bool = False, allow_base_mismatch: bool = False):
    """PeftModel.from_pretrained on loaded.model (LoRA layers are injected into it in place); refused when
    trained on other weights (adapter.check_base) unless allow_base_mismatch."""
    peft = _peft()
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{directory / 'adapter_config.json'} not found; pass a directory written by "
                                f"`lofit-ray lora` / save_lora")
    meta_path = directory / META_NAME
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        check_base(meta.get("base_model", "?"), meta.get("fingerprint", ""), loaded.spec, loaded.fingerprint,
                   allow_base_mismatch, what="LoRA adapter")
    peft_model = peft.PeftModel.from_pretrained(loaded.model, str(directory), is_trainable=trainable)
    inner_model(peft_model).eval()
    return peft_model
