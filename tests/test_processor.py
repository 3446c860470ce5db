"""The VideoFlash processor on real mp4 files (PyAV writes them, decord reads them): frame indices of
the policies against hand-worked cases, decoding at the target size, the ChatML prompt with the time
message, images, and loading with AutoProcessor(trust_remote_code=True)."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.inference_helpers import frame_id, model_package_files, tiny_chat_model, tiny_tokenizer, write_mp4
from videoflash.data.decode import VideoDecoder
from videoflash.model.processing_videoflash import VideoFlashProcessor, time_message


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def video15s(tmp_path_factory):
    """60 frames at 4 fps: 15 s."""
    return write_mp4(tmp_path_factory.mktemp("vid") / "v15.mp4", 60, fps=4)


def _proc(tok, **kw):
    fields = dict(image_size=64, tokens_per_frame=4, tokens_per_image=16, min_frames=8, max_frames=24, max_grid=2)
    fields.update(kw)
    return VideoFlashProcessor(tok, **fields)


def test_dynamic_fps1_picks_the_hand_worked_frames(tok, video15s):
    proc = _proc(tok)
    frames, meta = proc.load_video(video15s)
    # 15 s -> 4*floor(15/4) = 12 frames (inside 8..24); midpoints of linspace(0, 60, 13) = 0,5,...,60
    expected = [(5 * k + 5 * (k + 1) - 1) // 2 for k in range(12)]
    assert expected[:3] == [2, 7, 12]
    assert meta.indices == expected
    assert frames.dtype == torch.uint8 and tuple(frames.shape) == (12, 64, 64, 3)
    assert [frame_id(f) for f in frames] == expected  # the pixels are those frames
    assert meta.time_message == "The video lasts for 15.00 seconds, and 12 frames are uniformly sampled from it."


def test_caps_floors_and_spans(tok, video15s, tmp_path):
    proc = _proc(tok)
    # max_frames=8 caps the 12: bounds int(60k/8) = 0,7,15,22,30,37,45,52,60
    frames, meta = proc.load_video(video15s, max_frames=8)
    assert meta.indices == [3, 10, 18, 25, 33, 40, 48, 55]
    assert [frame_id(f) for f in frames] == meta.indices
    # an 8 s video (32 frames) gives 8 by the rule; min_frames=16 oversamples: bounds 2k -> midpoints 2k
    short = write_mp4(tmp_path / "v8.mp4", 32, fps=4)
    _, meta = proc.load_video(short, min_frames=16)
    assert meta.indices == list(range(0, 32, 2))
    # the span 5 s..10 s is frames [20, 40): 5 s -> 4 frames, raised to min_frames 8;
    # bounds linspace(0, 20, 9) -> 0,2,5,7,10,12,15,17,20
    frames, meta = proc.load_video(video15s, start=5.0, end=10.0)
    assert meta.indices == [20, 23, 25, 28, 30, 33, 35, 38]
    assert [frame_id(f) for f in frames] == meta.indices
    assert meta.time_message.startswith("The video lasts for 5.00 seconds, and 8 frames")
    # the middle policy takes exactly max_frames
    _, meta = _proc(tok, frame_policy="middle", max_frames=4).load_video(video15s)
    assert meta.indices == [7, 22, 37, 52]


def test_bytes_and_decoded_frames_match_the_file(tok, video15s):
    proc = _proc(tok)
    from_file, _ = proc.load_video(video15s)
    from_bytes, meta = proc.load_video(video15s.read_bytes())
    assert torch.equal(from_file, from_bytes)
    # the data room decodes training samples the same way: same pixels at the same indices
    ref = VideoDecoder(video15s.read_bytes(), size=64).frames(meta.indices)
    assert torch.equal(from_file, ref)
    # already decoded frames: the policy still samples them, at the rate given
    all_frames = VideoDecoder(video15s.read_bytes(), size=64).frames(range(60))
    got, meta2 = proc.load_video(all_frames, fps=4.0)
    assert meta2.indices == meta.indices and torch.equal(got, from_file)


def test_widths_decord_cannot_scale_to_fall_back_to_a_resize(tok, video15s):
    proc = _proc(tok, image_size=32)  # decord 3.4 fails at a 32 px output width
    frames, meta = proc.load_video(video15s)
    assert tuple(frames.shape) == (12, 32, 32, 3)
    assert [frame_id(f) for f in frames] == meta.indices


def test_prompt_is_chatml_with_the_time_message(tok, video15s):
    proc = _proc(tok)
    out = proc(text="What color is the shape?", videos=str(video15s))
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nThe video lasts for 15.00 seconds, and 12 frames are uniformly sampled "
        "from it. What color is the shape?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert out["input_ids"][0].tolist() == tok(expected, add_special_tokens=False)["input_ids"]
    assert int((out["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum()) == 1
    assert out["attention_mask"].tolist() == [[1] * out["input_ids"].shape[1]]
    assert out["video_frame_counts"].tolist() == [12]
    assert out["pixel_values_videos"].dtype == torch.uint8
    assert set(out.keys()) == {"input_ids", "attention_mask", "pixel_values_videos", "video_frame_counts"}
    # a later turn: the placeholder and time message stay in the first user turn only
    history = [{"role": "user", "content": "What color is the shape?"}, {"role": "assistant", "content": "red"}]
    out2 = proc(text="Where does it move?", videos=str(video15s), history=history)
    expected2 = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nThe video lasts for 15.00 seconds, and 12 frames are uniformly sampled "
        "from it. What color is the shape?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
        "<|im_start|>user\nWhere does it move?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(out2["input_ids"][0]) == expected2
    assert time_message(3.456, 8) == "The video lasts for 3.46 seconds, and 8 frames are uniformly sampled from it."


def test_images_become_thumbnail_and_tiles(tok):
    proc = _proc(tok)
    img = torch.zeros(64, 128, 3, dtype=torch.uint8)
    img[:, :64] = torch.tensor([200, 0, 0], dtype=torch.uint8)  # left half red
    img[:, 64:] = torch.tensor([0, 0, 200], dtype=torch.uint8)  # right half blue
    out = proc(text="Describe the image.", images=img.numpy())
    # 128x64 fits a 2-wide, 1-high canvas exactly: grid (1, 2), thumbnail + 2 tiles
    assert out["image_grids"].tolist() == [[1, 2]]
    tiles = out["pixel_values_images"]
    assert tuple(tiles.shape) == (3, 64, 64, 3) and out["image_tile_counts"].tolist() == [3]
    assert tiles[1, ..., 0].float().mean() > 190 and tiles[1, ..., 2].float().mean() < 10  # left tile red
    assert tiles[2, ..., 2].float().mean() > 190 and tiles[2, ..., 0].float().mean() < 10  # right tile blue
    prompt = tok.decode(out["input_ids"][0])
    assert "<image>\nDescribe the image." in prompt and "lasts for" not in prompt


def test_processor_output_runs_through_the_model(tok, video15s):
    model = tiny_chat_model(tok)
    proc = VideoFlashProcessor.from_model_config(tok, model.config, min_frames=8, max_frames=24)
    out = proc(text="What color is the shape?", videos=str(video15s))
    with torch.no_grad():
        logits = model(**out).logits
    # 12 frames -> 3 clips -> 48 visual tokens replace the placeholder
    assert logits.shape[1] == out["input_ids"].shape[1] - 1 + 48


def test_autoprocessor_loads_the_saved_processor(tok, video15s, tmp_path):
    from transformers import AutoProcessor

    proc = _proc(tok, frame_policy="fps:2", min_frames=4, max_frames=16, system_prompt="Be brief.")
    VideoFlashProcessor.register_for_auto_class("AutoProcessor")
    out_dir = tmp_path / "proc_export"
    proc.save_pretrained(out_dir)
    for path in model_package_files():
        shutil.copy(path, out_dir / path.name)
    loaded = AutoProcessor.from_pretrained(out_dir, trust_remote_code=True)
    assert type(loaded).__name__ == "VideoFlashProcessor"
    assert type(loaded) is not VideoFlashProcessor  # the copy in the directory, not this repo's class
    for field in ("frame_policy", "min_frames", "max_frames", "image_size", "image_mean", "image_std",
                  "tokens_per_frame", "system_prompt"):
        assert getattr(loaded, field) == getattr(proc, field), field
    a = proc(text="What is shown?", videos=str(video15s))
    b = loaded(text="What is shown?", videos=str(video15s))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # fps:2 on 15 s -> 4*floor(30/4) = 28, capped at 16
    assert a["video_frame_counts"].tolist() == [16]
    assert "<|im_start|>system\nBe brief.<|im_end|>" in tok.decode(a["input_ids"][0])
