"""Stable Diffusion checkpoints: detection, key remapping and conversion (single file,
diffusers folder, sumie native), and LoRA files. See :mod:`.formats` for the layouts,
:mod:`.families` for the registry and :mod:`.lora` for LoRA layouts."""

from .families import FAMILIES, Family, TextEncoderSpec, detect_family, family, unet_features
from .formats import (SDCheckpoint, TextEncoderWeights, check_text_encoder, convert, load_diffusers, load_native,
                      load_sd, load_single_file, load_text_encoder_file, load_vae_file, override_text_encoders,
                      save_diffusers, save_native, save_single_file)
from .lora import apply_loras, read_lora
from .tensors import TensorRef, load_pickle, open_safetensors, open_weights

__all__ = ["FAMILIES", "Family", "TextEncoderSpec", "detect_family", "family", "unet_features", "SDCheckpoint",
           "TextEncoderWeights", "check_text_encoder", "convert", "load_diffusers", "load_native", "load_sd",
           "load_single_file", "load_text_encoder_file", "load_vae_file", "override_text_encoders", "save_diffusers",
           "save_native", "save_single_file", "apply_loras", "read_lora", "TensorRef", "load_pickle",
           "open_safetensors", "open_weights"]
