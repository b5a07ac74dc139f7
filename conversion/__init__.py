"""Strict converters from Hugging Face (safetensors) and GGUF checkpoints to `mdm_circuits` models."""

from conversion.convert import Converted, convert, fill_parameters, resolve_source
from conversion.errors import ConversionError
from conversion.hf_configs import config_from_hf

__all__ = ["ConversionError", "Converted", "config_from_hf", "convert", "fill_parameters", "resolve_source"]
