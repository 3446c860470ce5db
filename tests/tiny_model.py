"""Tiny VideoFlash configurations for CPU tests (a few layers, width 64)."""

from __future__ import annotations

import torch

from videoflash.model.configuration_videoflash import VideoFlashConfig
from videoflash.model.modeling_videoflash import VideoFlashForConditionalGeneration

IMAGE_TOKEN = 199
VOCAB = 200


def tiny_config(**overrides) -> VideoFlashConfig:
    """UMT width 64 at 64 px (16 patches per frame, 64 per clip), merged to 16 tokens per clip and
    per image; a 4-layer Qwen2 of width 64."""
    text = dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=1024,
        rope_theta=10000.0,
    )
    text.update(overrides.pop("text", {}))
    kwargs = dict(
        vision_config=dict(width=64, depth=2, num_heads=4, image_size=64, patch_size=16),
        text_config=text,
        tokens_per_clip=16,
        tokens_per_image=16,
        image_token_id=IMAGE_TOKEN,
    )
    kwargs.update(overrides)
    return VideoFlashConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> VideoFlashForConditionalGeneration:
    torch.manual_seed(seed)
    return VideoFlashForConditionalGeneration(tiny_config(**overrides))


def random_frames(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)
