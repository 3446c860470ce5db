"""The processor's reference rules (what a converted VideoChat-Flash release uses), each against the
release's rule written out here: its clip span and min/max arithmetic, full-size decode + bicubic,
several images padded to a square with the mean colour, and the release's grid pinpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_tools.media import write_mp4
from tests.inference_helpers import frame_id, tiny_tokenizer
from tests.inference_helpers import write_mp4 as write_indexed_mp4
from videoflash.model.anyres import resize_frames
from videoflash.model.processing_videoflash import VideoFlashProcessor, reference_span

REFERENCE = dict(frame_rules="videochat_flash", resize="exact", multi_image="pad")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _proc(tok, **kw):
    fields = dict(image_size=64, tokens_per_frame=4, tokens_per_image=16, min_frames=8, max_frames=24, max_grid=2)
    fields.update(kw)
    return VideoFlashProcessor(tok, **fields)


def _textured_mp4(path, num_frames=8, fps=4, width=176, height=144, seed=0):
    """A real H.264 mp4 of random 16x16 blocks (edges the codec keeps, so resizing paths differ)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (num_frames, height // 16, width // 16, 3), dtype=np.uint8)
    write_mp4(str(path), base.repeat(16, axis=1).repeat(16, axis=2), fps, crf=12)
    return path


def test_reference_span_is_the_releases_arithmetic():
    # 300 frames at 30 fps (10 s); start 2.5 s, end 9.97 s -> end clamped to 10 - 0.1 = 9.9 s
    first, vlen, duration = reference_span(300, 30.0, 2.5, 9.97)
    assert duration == pytest.approx(9.9 - 2.5)
    assert (first, vlen) == (int(2.5 * 30.0), int((9.9 - 2.5) * 30.0)) == (75, 222)
    # a start of 1.99 s truncates to frame 59 (rounding would give 60)
    assert reference_span(300, 30.0, 1.99, None)[0] == 59
    with pytest.raises(ValueError, match="empty span"):
        reference_span(300, 30.0, 9.95, 12.0)


def test_reference_rules_sample_the_release_frames(tok, tmp_path):
    video = write_indexed_mp4(tmp_path / "v15.mp4", 60, fps=4)  # 15 s, frame i coloured by i
    proc = _proc(tok, frame_rules="videochat_flash")
    # the min wins over a smaller max (videoflash's own rule lowers the min: 4 frames)
    _, meta = proc.load_video(video, max_frames=4)
    assert len(meta.indices) == 8
    assert len(_proc(tok).load_video(video, max_frames=4)[1].indices) == 4
    # span 5.1 s .. 15 s: end -> 14.9, duration 9.8 s, int(9.8 * 4) = 39 frames from int(5.1 * 4) = 20;
    # 4 * floor(9.8 / 4) = 8 frames, the midpoints of linspace(0, 39, 9) truncated, offset by 20
    frames, meta = proc.load_video(video, start=5.1, end=15.0)
    bounds = np.linspace(0, 39, 9).astype(int)
    expected = [20 + (bounds[i] + bounds[i + 1] - 1) // 2 for i in range(8)]
    assert meta.indices == expected
    assert [frame_id(f) for f in frames] == expected
    assert meta.time_message.startswith("The video lasts for 9.80 seconds, and 8 frames")


def test_exact_path_is_full_size_decode_then_bicubic(tok, tmp_path):
    import decord

    video = _textured_mp4(tmp_path / "tex.mp4", num_frames=80)  # 20 s -> 20 frames: two decode chunks
    exact, meta = _proc(tok, resize="exact").load_video(video)
    full = decord.VideoReader(str(video)).get_batch(meta.indices).asnumpy()
    assert full.shape[1:] == (144, 176, 3)
    assert torch.equal(exact, resize_frames(torch.from_numpy(full), 64, 64))
    fast, _ = _proc(tok).load_video(video)
    diff = (exact.float() - fast.float()).abs()
    # decode-time scaling is another filter: close, not equal (docs/model.md states the tolerance)
    assert 0 < diff.mean().item() < 12


def test_several_images_are_padded_to_a_square_with_the_mean_colour(tok):
    proc = _proc(tok, multi_image="pad")
    wide = np.zeros((16, 64, 3), np.uint8)
    wide[...] = (250, 10, 10)
    tall = np.zeros((64, 32, 3), np.uint8)
    tall[...] = (10, 250, 10)
    out = proc(text="Compare them.", images=[wide, tall])
    tiles = out["pixel_values_images"]
    fill = np.array([int(255 * 0.485), int(255 * 0.456), int(255 * 0.406)], np.uint8)  # (123, 116, 103)
    sq_wide = np.tile(fill, (64, 64, 1))
    sq_wide[24:40] = wide  # (64 - 16) // 2 = 24 rows above
    sq_tall = np.tile(fill, (64, 64, 1))
    sq_tall[:, 16:48] = tall  # (64 - 32) // 2 = 16 columns left
    assert torch.equal(tiles[0], torch.from_numpy(sq_wide)) and torch.equal(tiles[1], torch.from_numpy(sq_tall))
    squashed = _proc(tok)(text="Compare them.", images=[wide, tall])["pixel_values_images"]
    assert not torch.equal(squashed, tiles)


def test_grid_pinpoints_replace_the_square_of_grids(tok):
    img = np.zeros((64, 64, 3), np.uint8)
    # only a 2-wide 1-high canvas and a 1x1 one: a square image picks 1x1 by effective resolution ties
    # going to the least waste; a 3:1 image picks the 2x1 canvas
    proc = _proc(tok, grid_pinpoints=[[128, 64], [64, 64]])
    assert proc(text="?", images=img)["image_grids"].tolist() == [[1, 1]]
    assert proc(text="?", images=np.zeros((40, 120, 3), np.uint8))["image_grids"].tolist() == [[1, 2]]
    # 1..2 x 1..2 by default: the 40x120 image picks 2 wide, and 2x2 is allowed for a big square
    assert _proc(tok)(text="?", images=np.zeros((128, 128, 3), np.uint8))["image_grids"].tolist() == [[2, 2]]
    # with the pinpoints, 128x128 scales to 64x64 on either canvas: the tie goes to the 1x1 (less waste)
    assert proc(text="?", images=np.zeros((128, 128, 3), np.uint8))["image_grids"].tolist() == [[1, 1]]
    with pytest.raises(ValueError, match="multiples"):
        _proc(tok, grid_pinpoints=[[100, 64]])
