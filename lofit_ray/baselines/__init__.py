"""Baselines LoFiT is compared against: ITI (an Adapter, method "iti") and LoRA (through peft).

Importable without Ray, MLflow or peft; the LoRA functions import peft when they run.
"""
from .iti import (
    DEFAULT_ALPHAS, fit_iti, head_activations, item_groups, iti_adapter, iti_directions, probe_heads,
)
from .lora import (
    DEFAULT_TARGETS, count_lora_parameters, evaluate_lora, load_lora, lora_loaded, lora_parameter_count, save_lora, train_lora, wrap_lora,
)

__all__ = [
    "DEFAULT_ALPHAS", "DEFAULT_TARGETS", "count_lora_parameters", "evaluate_lora", "fit_iti", "head_activations", "item_groups",
    "iti_adapter", "iti_directions", "load_lora", "lora_loaded", "lora_parameter_count", "probe_heads",
    "save_lora", "train_lora", "wrap_lora",
]
