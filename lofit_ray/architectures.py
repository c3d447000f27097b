"""Where each supported architecture keeps its attention output projection.

LoFiT acts on the input of the attention output projection: the concatenated
per-head outputs, laid out head-major as [..., heads * head_dim]. Every family
below computes attention the same way up to that point, so one forward
pre-hook per layer serves all of them (eager, SDPA and flash attention alike).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The model's family is not in the table below."""


@dataclass(frozen=True)
class Family:
    layers: str  # dotted path from the CausalLM to its decoder layer list
    o_proj: str  # dotted path from a decoder layer to its attention output projection
    bias_flag: str | None  # config flag that gives o_proj a bias (used by merge), None if hard-coded off


FAMILIES: dict[str, Family] = {
    "llama": Family("model.layers", "self_attn.o_proj", "attention_bias"),
    "mistral": Family("model.layers", "self_attn.o_proj", None),
    "qwen2": Family("model.layers", "self_attn.o_proj", None),
    "qwen3": Family("model.layers", "self_attn.o_proj", "attention_bias"),
    "gemma": Family("model.layers", "self_attn.o_proj", "attention_bias"),
    "gemma2": Family("model.layers", "self_attn.o_proj", "attention_bias"),
    "gemma3_text": Family("model.layers", "self_attn.o_proj", "attention_bias"),
}


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


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"architecture '{model_type}' is not supported by lofit-ray; supported: "
            f"{', '.join(sorted(FAMILIES))}. Add an entry to lofit_ray.architectures.FAMILIES naming where "
            f"its decoder layers and attention output projection live."
        )
    return FAMILIES[model_type]


def head_layout(config) -> HeadLayout:
    family_of(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return HeadLayout(config.model_type, config.num_hidden_layers, heads, head_dim)


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return _get(model, family_of(model.config).layers)


def o_projs(model: nn.Module) -> list[nn.Linear]:
    """The attention output projection of every decoder layer, in layer order."""
    family = family_of(model.config)
    return [_get(layer, family.o_proj) for layer in decoder_layers(model)]
