"""Torch models of evatok: attention + masks, quantizer, the EVATok tokenizer.

Modules here import torch only (no CLI, no stores, no torch.distributed).
"""

from __future__ import annotations

from evatok_cli.models.blockwise import BlockwiseCodec, DecoderState, EncoderState, PrefixState
from evatok_cli.models.quantizer import VectorQuantizer, nearest_code
from evatok_cli.models.tokenizer import (
    TOKENIZER_PRESETS,
    EVATokTokenizer,
    TokenizerConfig,
    TokenizerOutput,
    tokenizer_config,
)

__all__ = [
    "TOKENIZER_PRESETS",
    "BlockwiseCodec",
    "DecoderState",
    "EVATokTokenizer",
    "EncoderState",
    "PrefixState",
    "TokenizerConfig",
    "TokenizerOutput",
    "VectorQuantizer",
    "nearest_code",
    "tokenizer_config",
]
