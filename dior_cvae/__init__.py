"""Dior-CVAE for HuggingFace transformers: `DiorCVAEConfig`, `DiorCVAEForConditionalGeneration`."""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from .configuration_dior import DiorCVAEConfig
from .modeling_dior import DiorCVAEForConditionalGeneration, DiorCVAEOutput
from .scheduling_dior import DiorScheduler

AutoConfig.register(DiorCVAEConfig.model_type, DiorCVAEConfig, exist_ok=True)
AutoModel.register(DiorCVAEConfig, DiorCVAEForConditionalGeneration, exist_ok=True)
AutoModelForSeq2SeqLM.register(DiorCVAEConfig, DiorCVAEForConditionalGeneration, exist_ok=True)

__all__ = ["DiorCVAEConfig", "DiorCVAEForConditionalGeneration", "DiorCVAEOutput", "DiorScheduler"]
