"""Single-device SwitchHead, σ-MoE, SwitchAll and dense Transformer language models."""

from switchall.models.config import AttentionConfig, MLPConfig, ModelConfig, MoEConfig
from switchall.models.lm import LanguageModel, LMOutput, build_model
from switchall.models.routing import NoiseContext

__all__ = [
    "AttentionConfig",
    "LMOutput",
    "LanguageModel",
    "MLPConfig",
    "MoEConfig",
    "ModelConfig",
    "NoiseContext",
    "build_model",
]
