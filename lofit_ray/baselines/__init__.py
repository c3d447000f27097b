"""Baselines LoFiT is compared against: ITI (an Adapter, method "iti"), LoRA (through peft) and ReFT (LoReFT on a
hook, `baselines.reft`).

Importable without Ray, MLflow or peft; the LoRA functions import peft when they run.
"""
from .iti import (
    DEFAULT_ALPHAS, fit_iti, head_activations, item_groups, iti_adapter, iti_directions, probe_heads,
)
from .lora import (
    DEFAULT_TARGETS, count_lora_parameters, evaluate_lora, load_lora, lora_loaded, lora_parameter_count, save_lora, train_lora, wrap_lora,
)
from .reft import LoReFT, train_reft

__all__ = [
    "DEFAULT_ALPHAS", "DEFAULT_TARGETS", "LoReFT", "count_lora_parameters", "evaluate_lora", "fit_iti", "head_activations", "item_groups",
    "iti_adapter", "iti_directions", "load_lora", "lora_loaded", "lora_parameter_count", "probe_heads",
    "save_lora", "train_lora", "train_reft", "wrap_lora",
]
