"""lofit-ray: LoFiT (localized fine-tuning of attention heads) and a Ray/MLflow search service over it.

The core (this package's top-level modules other than distributed, search, tracking and cli)
imports neither Ray nor MLflow.
"""
from .adapter import Adapter, AdapterConfig
from .architectures import FAMILIES, HeadLayout, UnsupportedArchitectureError, head_layout
from .heads import HeadSet
from .models import LoadedModel, ModelSpecError, load_model
from .offsets import HeadOffsets
from .train import NaNLossError, TrainConfig, select_heads, tune_bias

__all__ = [
    "Adapter", "AdapterConfig", "FAMILIES", "HeadLayout", "HeadOffsets", "HeadSet", "LoadedModel",
    "ModelSpecError", "NaNLossError", "TrainConfig", "UnsupportedArchitectureError", "head_layout",
    "load_model", "select_heads", "tune_bias",
]
__version__ = "0.1.0"
