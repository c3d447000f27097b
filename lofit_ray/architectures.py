"""Where a model keeps its attention heads: the one place that decides whether lofit-ray supports a model.

LoFiT acts on the input of each decoder layer's attention output projection: the concatenated
per-head outputs, laid out head-major as [..., heads * head_dim]. Support is read from the model
itself, not from a list of family names:

  * the decoder layers are the nn.ModuleList holding config.num_hidden_layers modules;
  * in each layer, the attention module (a submodule whose class name contains "Attention") holds
    one nn.Linear named like an output projection (o_proj, out_proj, dense, wo): that Linear is fed
    by the concatenated head outputs;
  * the head layout (num_attention_heads, head_dim) comes from the config and must match that
    Linear's weight: in_features == heads * head_dim, out_features == hidden_size.

Whatever passes these checks gets one forward pre-hook per layer on that Linear (eager, SDPA and
flash attention alike). TESTED_FAMILIES lists the families tests/test_families.py runs end to end.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Names transformers gives the attention output projection (llama-likes: o_proj; gpt_neox, phi: dense;
# opt, bart-likes: out_proj; t5-likes: o; mpt/dbrx-likes: out_proj / wo).
OUTPUT_PROJECTION_NAMES = ("o_proj", "out_proj", "dense", "wo", "o")

# The families tests/test_families.py checks end to end (hook = merge, phases 1 and 2, export).
TESTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
                   "granite", "gpt_neox")
FAMILIES = TESTED_FAMILIES  # the name this tuple had when it was the list of the only supported families


class ModelSpecError(ValueError):
    """The model spec names nothing loadable; the message says what to pass instead. Every entry point
    (the CLI, jobs/search.py, jobs/reproduce.py) turns it into one line and exit 2."""


class UnsupportedArchitectureError(ModelSpecError):
    """The model has no separable attention heads that lofit-ray can find; the message says what is missing."""


@dataclass(frozen=True)
class HeadLayout:
    """The shape LoFiT's tensors take for one model: [num_layers, num_heads, head_dim]."""

    model_type: str
    num_layers: int
    num_heads: int
    head_dim: int

    @property
    def total_heads(self) -> int:
        return self.num_layers * self.num_heads


def text_config(config):
    """The language model's config (a multimodal config nests it; a text-only config is its own)."""
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def head_layout(config) -> HeadLayout:
    """The head layout a config declares (no weights needed: checked against them by `check_model`)."""
    cfg = text_config(config)
    model_type = getattr(cfg, "model_type", None) or "unknown"
    heads, layers = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_hidden_layers", None)
    if not isinstance(heads, int) or not isinstance(layers, int) or heads < 1 or layers < 1:
        raise UnsupportedArchitectureError(
            f"model type '{model_type}' is not supported by lofit-ray: its config declares no attention heads "
            f"(num_attention_heads={heads}, num_hidden_layers={layers}); LoFiT needs a decoder with multi-head attention")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return HeadLayout(model_type, layers, heads, head_dim)


def _layers_path(model: nn.Module) -> str:
    """The dotted name of the decoder's layer list: the ModuleList with num_hidden_layers entries."""
    count = head_layout(model.config).num_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and name:
            return name
    raise UnsupportedArchitectureError(
        f"model type '{model.config.model_type}' is not supported by lofit-ray: no list of "
        f"{count} decoder layers (num_hidden_layers) found in {type(model).__name__}")


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return _get(model, _layers_path(model))


def layers_parent(model: nn.Module) -> tuple[nn.Module, str]:
    """(module, attribute) holding the decoder's layer list, so it can be swapped (frozen_layers.tail_only)."""
    parent, _, name = _layers_path(model).rpartition(".")
    return _get(model, parent), name


def _output_projection(layer: nn.Module) -> tuple[str, nn.Linear] | None:
    """The attention output projection of one decoder layer: (dotted name within the layer, module)."""
    found = []
    for name, module in layer.named_modules():
        if "attention" not in type(module).__name__.lower():
            continue
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear) and child_name in OUTPUT_PROJECTION_NAMES:
                found.append((f"{name}.{child_name}" if name else child_name, child))
    return found[0] if len(found) == 1 else None


def o_projs(model: nn.Module) -> list[nn.Linear]:
    """The attention output projection of every decoder layer, in layer order (checked against the layout)."""
    layout = head_layout(model.config)
    width = layout.num_heads * layout.head_dim
    hidden = getattr(text_config(model.config), "hidden_size", None)
    projs = []
    for index, layer in enumerate(decoder_layers(model)):
        found = _output_projection(layer)
        if found is None:
            raise UnsupportedArchitectureError(
                f"model type '{layout.model_type}' is not supported by lofit-ray: decoder layer {index} "
                f"({type(layer).__name__}) has no attention output projection (one nn.Linear named "
                f"{'/'.join(OUTPUT_PROJECTION_NAMES)} inside a module whose class name contains 'Attention')")
        name, proj = found
        if proj.in_features != width or (hidden is not None and proj.out_features != hidden):
            raise UnsupportedArchitectureError(
                f"model type '{layout.model_type}' is not supported by lofit-ray: layer {index}'s {name} maps "
                f"{proj.in_features} -> {proj.out_features} features, but the config's {layout.num_heads} heads "
                f"x head_dim {layout.head_dim} = {width} -> hidden_size {hidden}: its input is not the "
                f"concatenated head outputs")
        projs.append(proj)
    return projs


def check_model(model: nn.Module) -> HeadLayout:
    """Raise UnsupportedArchitectureError unless LoFiT can hook every layer of `model`; return its layout.
    Works on a model built on the meta device, so a checkpoint is checked before its weights load."""
    o_projs(model)
    return head_layout(model.config)
