"""One generation pipeline for every model family: text to image, img2img and variations,
inpainting, outpainting (:func:`generate` over a family's components, one request type,
one result type)."""

from .core import generate
from .families import Defaults, SDFamily, SumieFamily, is_sd_model, load_family
from .request import FILL_MODES, GenerationRequest, GenerationResult

__all__ = ["Defaults", "FILL_MODES", "GenerationRequest", "GenerationResult", "SDFamily", "SumieFamily", "generate",
           "is_sd_model", "load_family"]
