"""Stable Diffusion checkpoints: detection, key remapping and conversion (single file,
diffusers folder, sumie native). See :mod:`.formats` for the layouts and :mod:`.families`
for the registry."""

from .families import FAMILIES, Family, TextEncoderSpec, detect_family, family, unet_features
from .formats import (SDCheckpoint, TextEncoderWeights, convert, load_diffusers, load_native, load_sd,
                      load_single_file, load_text_encoder_file, load_vae_file, save_diffusers, save_native,
                      save_single_file)
from .tensors import TensorRef, load_pickle, open_safetensors, open_weights

__all__ = ["FAMILIES", "Family", "TextEncoderSpec", "detect_family", "family", "unet_features", "SDCheckpoint",
           "TextEncoderWeights", "convert", "load_diffusers", "load_native", "load_sd", "load_single_file",
           "load_text_encoder_file", "load_vae_file", "save_diffusers", "save_native", "save_single_file",
           "TensorRef", "load_pickle", "open_safetensors", "open_weights"]
