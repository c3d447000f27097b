"""lofit-ray: LoFiT (localized fine-tuning of attention heads) and a Ray/MLflow search service over it.

The core (config, models, architectures, offsets, heads, selectors, adapter, tasks, losses, train,
evaluate, baselines) imports neither Ray nor MLflow. The service layer wraps it: distributed (Ray Train),
search (Ray Tune), experiments (the reproduction), cli; tracking is the one module that talks to MLflow.
"""
from .adapter import Adapter, AdapterConfig
from .architectures import FAMILIES, HeadLayout, UnsupportedArchitectureError, head_layout
from .heads import HeadSet
from .models import LoadedModel, ModelSpecError, load_model
from .offsets import HeadOffsets
from .config import LoraConfig, Phase1Config, Phase2Config, TrainingConfig
from .selectors import select_heads
from .train import NaNLossError, train_offsets

__all__ = [
    "Adapter", "AdapterConfig", "FAMILIES", "HeadLayout", "HeadOffsets", "HeadSet", "LoadedModel",
    "LoraConfig", "ModelSpecError", "NaNLossError", "Phase1Config", "Phase2Config", "TrainingConfig",
    "UnsupportedArchitectureError", "head_layout", "load_model", "select_heads", "train_offsets",
]
__version__ = "0.1.0"
