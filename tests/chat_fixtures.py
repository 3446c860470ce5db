"""Fixtures shared by the chat and KV-compression tests: the tiny ChatML tokenizer, the tiny chat
model over it (seed 3), a 15 s mp4 and the processor those tests ask with. Import the fixtures into
a test module (``from tests.chat_fixtures import model, tok, video  # noqa: F401``)."""

from __future__ import annotations

import pytest

from tests.inference_helpers import tiny_chat_model, tiny_tokenizer, write_mp4
from videoflash.model.processing_videoflash import VideoFlashProcessor


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_chat_model(tok, seed=3)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """60 frames at 4 fps (15 s): dynamic_fps1 8..24 takes 12 frames, indices 2, 7, ..., 57, so 48+
    visual tokens in several 4-frame chunks."""
    return write_mp4(tmp_path_factory.mktemp("chat") / "v.mp4", 60, fps=4)


def chat_processor(tok, model) -> VideoFlashProcessor:
    """The processor of these tests: the model's own settings with 8..24 frames."""
    return VideoFlashProcessor.from_model_config(tok, model.config, min_frames=8, max_frames=24)
