"""The shippable LoFiT adapter: a head list + offsets v, saved as a small directory.

    adapter_config.json    base model identity, heads, task, hyperparameters
    offsets.safetensors    "offset": [K, head_dim] float32 (the offsets v; "bias" in files of 0.1)

`attach` hooks it onto a loaded model; `merge_and_unload` folds v into o_proj
biases in place; `export` writes a plain transformers checkpoint whose logits
equal the hooked model's (lofit_ray.export says how, per family).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .architectures import head_layout
from .export import merge_offsets, merged_checkpoint
from .offsets import HeadOffsets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "offsets.safetensors"


@dataclass
class AdapterConfig:
    base_model: str
    fingerprint: str
    layout: dict
    heads: list[list[int]]  # [[layer, head], ...] in the order of the rows of "offset"
    task: str = ""
    method: str = "lofit"  # lofit | random | iti | transfer
    head_set: dict = field(default_factory=dict)  # provenance of the heads: method, task, seed, k
    hparams: dict = field(default_factory=dict)
    format_version: int = 1
    eval_kind: str = ""  # "mc" | "generation": how the task scores (a user task's kind decides); "" = from the task name


class Adapter:
    def __init__(self, config: AdapterConfig, offset: torch.Tensor):
        if offset.shape != (len(config.heads), config.layout["head_dim"]):
            raise ValueError(f"offset has shape {tuple(offset.shape)}, expected ({len(config.heads)}, "
                             f"{config.layout['head_dim']}) for {len(config.heads)} heads")
        self.config = config
        self.offset = offset.detach().float().cpu()

    @property
    def num_parameters(self) -> int:
        return self.offset.numel()

    @classmethod
    def from_offsets(cls, offsets: HeadOffsets, loaded, *, task: str = "", head_set=None, hparams=None,
                     method: str | None = None) -> "Adapter":
        provenance = {}
        if head_set is not None:
            provenance = {"method": head_set.method, "task": head_set.task, "seed": head_set.seed, "k": head_set.k}
        config = AdapterConfig(
            base_model=loaded.spec, fingerprint=loaded.fingerprint, layout=asdict(offsets.layout),
            heads=[list(h) for h in offsets.offset_heads], task=task,
            method=method or (head_set.method if head_set is not None else "lofit"),
            head_set=provenance, hparams=hparams or {},
        )
        return cls(config, offsets.offset)

    # -- files ------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=1))
        save_file({"offset": self.offset.contiguous()}, str(directory / WEIGHTS_NAME))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Adapter":
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found; pass a directory written by `lofit-ray train`")
        config = AdapterConfig(**json.loads((directory / CONFIG_NAME).read_text()))
        tensors = load_file(str(directory / WEIGHTS_NAME))
        return cls(config, tensors["offset"] if "offset" in tensors else tensors["bias"])

    # -- applying -----------------------------------------------------------------------
    def to_offsets(self) -> HeadOffsets:
        from .architectures import HeadLayout

        offsets = HeadOffsets(HeadLayout(**self.config.layout), offset_heads=[tuple(h) for h in self.config.heads])
        with torch.no_grad():
            offsets.offset.copy_(self.offset)
        offsets.requires_grad_(False)
        return offsets

    def check_compatible(self, model, fingerprint: str | None = None) -> None:
        layout = asdict(head_layout(model.config))
        if layout != self.config.layout:
            raise ValueError(f"adapter was trained for layout {self.config.layout}, model has {layout}; "
                             f"use an adapter trained on {self.config.base_model}")
        if fingerprint and fingerprint != self.config.fingerprint:
            print(f"[lofit-ray] warning: model fingerprint {fingerprint} differs from the adapter's "
                  f"{self.config.fingerprint} (trained on {self.config.base_model})")

    def attach(self, model, fingerprint: str | None = None) -> HeadOffsets:
        self.check_compatible(model, fingerprint)
        return self.to_offsets().attach(model)

    def merge_and_unload(self, model):
        """Fold v into o_proj biases in place: o_proj(z + v) = W z + (b + W v). No hooks remain."""
        self.check_compatible(model)
        return merge_offsets(model, self.to_offsets().full_offset())

    def export(self, loaded, directory: str | Path, dtype: str | None = None) -> Path:
        """Write a plain transformers checkpoint with v merged, loadable by AutoModelForCausalLM alone.

        dtype: of the written weights; default the checkpoint's own (loaded.source_dtype), so a bfloat16
        model trained in float32 exports in bfloat16. Families whose config cannot give o_proj a bias are
        re-expressed as an identical family that can (lofit_ray.export), or refused with the reason."""
        self.check_compatible(loaded.model)
        dtype = dtype or getattr(loaded, "source_dtype", None) or str(next(loaded.model.parameters()).dtype)
        merged = merged_checkpoint(loaded.model, self.to_offsets().full_offset())
        merged.to(getattr(torch, dtype.removeprefix("torch.")))
        directory = Path(directory)
        merged.save_pretrained(directory)
        loaded.tokenizer.save_pretrained(directory)
        (directory / "lofit_adapter_config.json").write_text(json.dumps(asdict(self.config), indent=1))
        return directory
