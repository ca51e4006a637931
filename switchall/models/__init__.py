"""Single-device SwitchHead, σ-MoE, SwitchAll and dense Transformer language models."""

from switchall.models.config import AttentionConfig, MLPConfig, ModelConfig, MoEConfig
from switchall.models.lm import LanguageModel, LMOutput, build_model
from switchall.models.pretrained import (
    PretrainedError,
    load_pretrained,
    load_pretrained_state,
    open_pretrained,
    save_pretrained,
)
from switchall.models.routing import NoiseContext

__all__ = [
    "AttentionConfig",
    "LMOutput",
    "LanguageModel",
    "MLPConfig",
    "MoEConfig",
    "ModelConfig",
    "NoiseContext",
    "PretrainedError",
    "build_model",
    "load_pretrained",
    "load_pretrained_state",
    "open_pretrained",
    "save_pretrained",
]
