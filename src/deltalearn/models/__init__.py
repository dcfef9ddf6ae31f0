"""The DeltaLM language model: configuration, presets, model with generation, caches."""

from deltalearn.models.cache import DeltaLMCache, DeltaLMStaticCache
from deltalearn.models.configuration_deltalm import DeltaLMConfig
from deltalearn.models.modeling_deltalm import DeltaLM
from deltalearn.models.outputs import DeltaLMGates, DeltaLMOutput
from deltalearn.models.presets import SIZES, VARIANTS


def register_auto_classes() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` resolve `model_type="deltalm"` (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(DeltaLMConfig.model_type, DeltaLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(DeltaLMConfig, DeltaLM, exist_ok=True)


__all__ = [
    "SIZES",
    "VARIANTS",
    "DeltaLM",
    "DeltaLMCache",
    "DeltaLMConfig",
    "DeltaLMGates",
    "DeltaLMOutput",
    "DeltaLMStaticCache",
    "register_auto_classes",
]
