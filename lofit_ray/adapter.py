"""The shippable LoFiT adapter: a head list + offsets v, saved as a small directory.

    adapter_config.json    base model identity, heads, task, hyperparameters
    offsets.safetensors    "offset": [K, head_dim] float32 (the offsets v; "bias" in files of 0.1)

`attach` hooks it onto a loaded model; `merge_and_unload` folds v into o_proj
biases in place; `export` writes a plain transformers checkpoint whose logits
equal the hooked model's.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .architectures import UnsupportedArchitectureError, family_of, head_layout, o_projs
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
        full = self.to_offsets().full_offset()
        for layer, proj in enumerate(o_projs(model)):
            if not full[layer].any():
                continue
            extra = proj.weight.detach().float() @ full[layer].flatten().to(proj.weight.device)
            if proj.bias is None:
                proj.bias = torch.nn.Parameter(torch.zeros(proj.out_features, dtype=proj.weight.dtype,
                                                           device=proj.weight.device), requires_grad=False)
            with torch.no_grad():
                proj.bias.add_(extra.to(proj.bias.dtype))
        return model

    def export(self, loaded, directory: str | Path) -> Path:
        """Write a plain transformers checkpoint with v merged, loadable by AutoModelForCausalLM alone."""
        from transformers import AutoModelForCausalLM

        model = loaded.model
        flag = family_of(model.config).bias_flag
        if flag is None:
            raise UnsupportedArchitectureError(
                f"export: '{model.config.model_type}' hard-codes o_proj without a bias in transformers, so a "
                f"merged checkpoint cannot be loaded by plain transformers; ship the adapter directory and "
                f"attach it with lofit_ray.Adapter.from_pretrained(...).attach(model)")
        config = model.config.__class__.from_dict(model.config.to_dict())
        setattr(config, flag, True)
        merged = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
        missing, unexpected = merged.load_state_dict(model.state_dict(), strict=False)
        if unexpected or any(not k.endswith(".bias") for k in missing):
            raise RuntimeError(f"export: state dicts disagree (missing {missing[:3]}, unexpected {unexpected[:3]})")
        with torch.no_grad():
            for name in missing:  # the biases the flag switched on start at zero
                merged.get_parameter(name).zero_()
        self.merge_and_unload(merged)
        directory = Path(directory)
        merged.save_pretrained(directory)
        loaded.tokenizer.save_pretrained(directory)
        (directory / "lofit_adapter_config.json").write_text(json.dumps(asdict(self.config), indent=1))
        return directory
