"""Dior-CVAE for HuggingFace transformers: `DiorCVAEConfig`, `DiorCVAEForConditionalGeneration`."""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_dior import DiorCVAEConfig
from .modeling_dior import DiorCVAEForConditionalGeneration, DiorCVAEOutput
from .pipeline_dior import TASK as PIPELINE_TASK
from .pipeline_dior import DialogGenerationPipeline
from .scheduling_dior import DiorScheduler

AutoConfig.register(DiorCVAEConfig.model_type, DiorCVAEConfig, exist_ok=True)
AutoModel.register(DiorCVAEConfig, DiorCVAEForConditionalGeneration, exist_ok=True)
AutoModelForSeq2SeqLM.register(DiorCVAEConfig, DiorCVAEForConditionalGeneration, exist_ok=True)
# `pipeline("dialog-generation", model=model_object, tokenizer=tokenizer)` in this process; saved folders name the
# pipeline in config.json (custom_pipelines) for `pipeline(..., model=path, trust_remote_code=True)`.
PIPELINE_REGISTRY.register_pipeline(PIPELINE_TASK, pipeline_class=DialogGenerationPipeline,
                                    pt_model=AutoModelForSeq2SeqLM, type="text")

__all__ = [
    "DialogGenerationPipeline",
    "DiorCVAEConfig",
    "DiorCVAEForConditionalGeneration",
    "DiorCVAEOutput",
    "DiorScheduler",
]
