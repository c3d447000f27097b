"""The shippable LoFiT adapter: a head list + offsets v, saved as a small directory.

    adapter_config.json    base model identity, heads, task, hyperparameters
    offsets.safetensors    "offset": [K, head_dim] float32 (the offsets v; "bias" in files of 0.1)

`attach` hooks it onto a loaded model; `merge_and_unload` folds v into o_proj
biases in place; `export` writes a plain transformers checkpoint whose logits
equal the hooked model's (lofit_ray.export says how, per family).
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .architectures import HeadLayout, head_layout
from .export import merge_offsets, merged_checkpoint
from .offsets import HeadOffsets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "offsets.safetensors"


class AdapterError(ValueError):
    """An adapter that cannot be applied here: unreadable files (the message names the path) or another base
    model. A ValueError, so the CLI exits 2 with its one line."""


def check_base(trained_on: str, trained_fingerprint: str, model_name: str, fingerprint: str | None,
               allow_mismatch: bool = False, what: str = "adapter") -> None:
    """Refuse an adapter trained on other weights than the model's (their fingerprints differ): its offsets
    were fitted to those weights. allow_mismatch (--allow-base-mismatch) makes it a warning."""
    if not fingerprint or not trained_fingerprint or fingerprint == trained_fingerprint:
        return
    text = (f"the {what} was trained on {trained_on} (fingerprint {trained_fingerprint}), but the model here is "
            f"{model_name or 'another model'} (fingerprint {fingerprint})")
    if not allow_mismatch:
        raise AdapterError(f"{text}; load the base model it was trained on, or pass --allow-base-mismatch to "
                           f"apply it anyway")
    print(f"[lofit-ray] warning: {text}; applying it anyway (--allow-base-mismatch)", file=sys.stderr)


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
        """Read an adapter directory; a missing file is FileNotFoundError, any unreadable or inconsistent one
        an AdapterError naming its path, so the CLI ends in one line, never a traceback."""
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found; pass a directory written by `lofit-ray train`")
        config = _read_config(directory / CONFIG_NAME)
        weights = directory / WEIGHTS_NAME
        try:
            tensors = load_file(str(weights))
        except Exception as exc:  # safetensors raises its own SafetensorError, not an OSError
            raise AdapterError(f"{weights}: not a readable safetensors file ({exc}); re-save the adapter with "
                               f"`lofit-ray train` or Adapter.save_pretrained") from None
        offset = tensors.get("offset", tensors.get("bias"))
        if offset is None:
            raise AdapterError(f"{weights}: no 'offset' tensor (it holds {sorted(tensors)}); re-save the adapter")
        try:
            return cls(config, offset)
        except ValueError as exc:
            raise AdapterError(f"{weights}: {exc}; the files do not belong together, re-save the adapter") from None

    # -- applying -----------------------------------------------------------------------
    def to_offsets(self) -> HeadOffsets:
        offsets = HeadOffsets(HeadLayout(**self.config.layout), offset_heads=[tuple(h) for h in self.config.heads])
        with torch.no_grad():
            offsets.offset.copy_(self.offset)
        offsets.requires_grad_(False)
        return offsets

    def check_compatible(self, model, fingerprint: str | None = None, *, model_name: str = "",
                         allow_base_mismatch: bool = False) -> None:
        """The layout must match; with `fingerprint` (models.fingerprint of `model`), so must the weights
        (check_base), unless allow_base_mismatch."""
        layout = asdict(head_layout(model.config))
        if layout != self.config.layout:
            raise AdapterError(f"adapter was trained for layout {self.config.layout}, model has {layout}; "
                               f"use an adapter trained on {self.config.base_model}")
        check_base(self.config.base_model, self.config.fingerprint, model_name, fingerprint, allow_base_mismatch)

    def attach(self, model, fingerprint: str | None = None, *, model_name: str = "",
               allow_base_mismatch: bool = False) -> HeadOffsets:
        self.check_compatible(model, fingerprint, model_name=model_name, allow_base_mismatch=allow_base_mismatch)
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


def _read_config(path: Path) -> AdapterConfig:
    """adapter_config.json as an AdapterConfig, or an AdapterError naming the path and what is wrong."""
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc}); re-save the adapter with `lofit-ray train`") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(data).__name__}; re-save the adapter")
    try:
        config = AdapterConfig(**data)
        layout = HeadLayout(**config.layout)
    except TypeError as exc:  # a missing or unknown field, here or in its layout
        raise AdapterError(f"{path}: {exc}; re-save the adapter with `lofit-ray train`") from None
    def in_layout(h) -> bool:
        return (isinstance(h, list) and len(h) == 2 and all(isinstance(x, int) for x in h)
                and 0 <= h[0] < layout.num_layers and 0 <= h[1] < layout.num_heads)

    bad = [h for h in config.heads if not in_layout(h)] if isinstance(config.heads, list) else [config.heads]
    if bad:
        raise AdapterError(f"{path}: heads {bad[:3]} are not [layer, head] pairs inside the layout's "
                           f"{layout.num_layers} layers x {layout.num_heads} heads; re-save the adapter")
    return config
