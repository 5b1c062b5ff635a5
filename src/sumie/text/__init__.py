"""Tokenizers and text encoders: prompts -> (token embeddings, pooled, mask).

``base`` holds the interface, ``prompt`` A1111's weighting syntax and 75-token windows,
``clip_tokenizer`` CLIP's byte-level BPE, ``clip`` the CLIP text towers and their key
layouts, ``conditioner`` the per-family composition Stable Diffusion U-Nets expect,
``wordpiece`` BERT's tokenizer and ``bert`` a frozen pretrained BERT / sentence-transformer.
"""

from .base import TextEncoder, TextEncoderOutput, TokenizedBatch, Tokenizer
from .bert import BertConfig, BertModel, BertTextEncoder, load_bert_folder
from .clip import ClipTextConfig, ClipTextTransformer, load_clip_text, load_clip_text_folder
from .clip_tokenizer import ClipTokenizer, TokenizerError
from .conditioner import ClipTextEncoder, SDTextConditioner, sdxl_vector_cond
from .prompt import apply_weights, parse_prompt_weights, tokenize_weighted
from .wordpiece import WordPieceTokenizer

__all__ = ["TextEncoder", "TextEncoderOutput", "TokenizedBatch", "Tokenizer", "ClipTextConfig", "ClipTextTransformer",
           "load_clip_text", "load_clip_text_folder", "ClipTokenizer", "TokenizerError", "ClipTextEncoder",
           "SDTextConditioner", "sdxl_vector_cond", "apply_weights", "parse_prompt_weights", "tokenize_weighted",
           "BertConfig", "BertModel", "BertTextEncoder", "load_bert_folder", "WordPieceTokenizer"]
