"""Long videos: chunked encoding gives the tokens of one pass, memory grows with the tokens kept and
not with the frames decoded, precomputed tokens prefill like pixels, and YaRN scales RoPE as the
YaRN formula says."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.inference_helpers import tiny_chat_model, tiny_tokenizer, write_mp4
from tests.tiny_model import random_frames, tiny_model
from videoflash.model.modeling_videoflash import VideoFlashForConditionalGeneration
from videoflash.model.processing_videoflash import VideoFlashProcessor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=2).eval()


def test_chunked_encoding_equals_one_pass(model):
    frames = random_frames(48, seed=4)  # 12 clips
    with torch.no_grad():
        whole = model.encode_video(frames)
    for clips in (1, 5, 12, 100):
        chunked = model.encode_video_chunked(frames, max_clips_per_batch=clips)
        assert chunked.shape == whole.shape == (12 * 16, 64)
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    # an iterable of batches (what the processor yields while decoding), with and without total_frames
    batches = [frames[:8], frames[8:40], frames[40:]]
    torch.testing.assert_close(model.encode_video_chunked(iter(batches), 3, total_frames=48), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.encode_video_chunked(iter(batches), 3), whole, rtol=1e-5, atol=1e-5)
    assert not model.encode_video_chunked(frames, 2).requires_grad
    with pytest.raises(ValueError, match="whole clips"):
        model.encode_video_chunked(iter([frames[:6]]), 2)
    with pytest.raises(ValueError, match="total_frames"):
        model.encode_video_chunked(iter(batches), 3, total_frames=40)


def test_decoding_in_batches_from_a_file_equals_decoding_at_once(tmp_path):
    tok = tiny_tokenizer()
    m = tiny_chat_model(tok)
    proc = VideoFlashProcessor.from_model_config(tok, m.config, min_frames=4, max_frames=64)
    path = write_mp4(tmp_path / "v.mp4", 200, fps=2)  # 100 s -> 4*floor(100/4) = 100, capped at 64
    frames, meta = proc.load_video(path)
    assert meta.num_sampled == 64
    source = proc.open_video(path)
    batches = list(proc.iter_video_batches(source, proc.sample(source), batch_frames=24))
    assert [b.shape[0] for b in batches] == [24, 24, 16]
    torch.testing.assert_close(torch.cat(batches), frames, rtol=0, atol=0)
    with torch.no_grad():
        whole = m.encode_video(frames)
    torch.testing.assert_close(
        m.encode_video_chunked(proc.iter_video_batches(source, meta, 24), 4, total_frames=64), whole,
        rtol=1e-5, atol=1e-5,
    )


def test_precomputed_tokens_prefill_and_generate_like_pixels(model):
    frames = random_frames(16, seed=7)
    ids = torch.randint(0, 190, (1, 12), generator=torch.Generator().manual_seed(3))
    ids[0, 2] = model.config.image_token_id
    embeds = model.encode_video_chunked(frames, 2)
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values_videos=frames).logits
        b = model(input_ids=ids, video_embeds=embeds, video_frame_counts=torch.tensor([16])).logits
        c = model(input_ids=ids, video_embeds=embeds).logits  # one sample: counts inferred
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        g1 = model.generate(input_ids=ids, pixel_values_videos=frames, max_new_tokens=5, do_sample=False)
        g2 = model.generate(input_ids=ids, video_embeds=embeds, video_frame_counts=torch.tensor([16]),
                            max_new_tokens=5, do_sample=False)
    assert g1.tolist() == g2.tolist()
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=ids, video_embeds=embeds, pixel_values_videos=frames)
    with pytest.raises(ValueError, match="video_embeds hold"):
        model(input_ids=ids, video_embeds=embeds[:10], video_frame_counts=torch.tensor([16]))


MEMORY_PROBE = textwrap.dedent("""
    import gc, json, sys
    import torch
    from tests.inference_helpers import tiny_chat_model, tiny_tokenizer, write_mp4
    from videoflash.model.processing_videoflash import VideoFlashProcessor

    torch.set_num_threads(1)

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def peak_growth(fn):
        # bytes above the resident set at the start; writing 5 to clear_refs resets the peak (VmHWM)
        gc.collect()
        base = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        out = fn()
        return status("VmHWM") - base, out

    tok = tiny_tokenizer()
    model = tiny_chat_model(tok)
    proc = VideoFlashProcessor.from_model_config(tok, model.config, min_frames=4, max_frames=100000)
    path = write_mp4(sys.argv[1], 1024, fps=1)

    def chunked(n):
        source = proc.open_video(path)
        meta = proc.sample(source, max_frames=n, min_frames=n)
        return model.encode_video_chunked(proc.iter_video_batches(source, meta, 32), 4, total_frames=meta.num_sampled)

    def one_pass(n):
        frames, _ = proc.load_video(path, max_frames=n, min_frames=n)
        with torch.no_grad():
            return model.encode_video(frames)

    chunked(64), one_pass(64)  # warm up
    result = {}
    for name, fn in (("chunked", chunked), ("one_pass", one_pass)):
        for n in (64, 1024):
            grown, out = peak_growth(lambda: fn(n))
            result[f"{name}_{n}"] = grown
            result[f"tokens_{n}"] = out.numel() * out.element_size()
    print(json.dumps(result))
""")


def test_memory_grows_with_tokens_kept_not_frames_decoded(tmp_path):
    """Peak resident memory (VmHWM, reset per measurement) of encoding 64 vs 1024 frames decoded from
    an mp4; glibc is told to return large blocks to the OS at once so the peak follows live memory."""
    env = {**os.environ, "PYTHONPATH": REPO, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "long.mp4")], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    mb = 2**20
    # the measurement sees frames: one pass over 16x the frames needs far more memory
    assert r["one_pass_1024"] - r["one_pass_64"] > 50 * mb, r
    # chunked: 16x the frames costs no more than the extra tokens kept plus a little allocator slack
    assert r["chunked_1024"] - r["chunked_64"] <= (r["tokens_1024"] - r["tokens_64"]) + 4 * mb, r
    assert r["chunked_1024"] * 5 < r["one_pass_1024"], r


# --------------------------------------------------------------------------------------------------
# YaRN
# --------------------------------------------------------------------------------------------------


def yarn_reference(head_dim: int, base: float, factor: float, original: int, beta_fast: float = 32.0,
                   beta_slow: float = 1.0) -> tuple[list[float], float]:
    """YaRN (Peng et al., 2023) written out here: the rotary pair i turns at theta_i = base^(-2i/d)
    and makes r_i = original * theta_i / (2 pi) turns over the original context. Pairs that turn more
    than ``beta_fast`` times keep theta_i, pairs that turn fewer than ``beta_slow`` times are
    interpolated to theta_i / factor, and in between the share of interpolation grows linearly with
    the pair index, between the (floored) index where r = beta_fast and the (ceiled) index where
    r = beta_slow (the released implementation's ramp). Attention is sharpened by 0.1 ln(factor) + 1."""
    half = head_dim // 2
    theta = [base ** (-2.0 * i / head_dim) for i in range(half)]

    def index_where_turns(turns):  # solve original * base^(-2i/d) / (2 pi) = turns for i
        return head_dim * math.log(original / (2 * math.pi * turns)) / (2 * math.log(base))

    low = max(math.floor(index_where_turns(beta_fast)), 0)
    high = min(math.ceil(index_where_turns(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    inv = []
    for i in range(half):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: keep theta, 1: interpolate
        inv.append(theta[i] * (1 - ramp) + theta[i] / factor * ramp)
    return inv, 0.1 * math.log(factor) + 1.0


def test_yarn_frequencies_match_the_formula_beyond_the_native_length(tmp_path):
    model = tiny_model(seed=0).eval()  # Qwen2 head_dim 16, theta 1e4, 1024 positions
    rotary_default = model.get_decoder().rotary_emb
    params = model.enable_yarn(4.0)
    tc = model.config.text_config
    assert params == {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024}
    assert tc.rope_parameters == params and tc.max_position_embeddings == 4096
    rotary = model.get_decoder().rotary_emb
    assert rotary is not rotary_default
    inv_ref, mscale = yarn_reference(16, 10000.0, 4.0, 1024)
    torch.testing.assert_close(rotary.inv_freq, torch.tensor(inv_ref), rtol=1e-6, atol=0)
    assert rotary.attention_scaling == pytest.approx(mscale)
    # the regimes: the fastest pairs unchanged, the slowest interpolated by the factor
    theta = [10000.0 ** (-2 * i / 16) for i in range(8)]
    assert inv_ref[0] == pytest.approx(theta[0]) and inv_ref[7] == pytest.approx(theta[7] / 4)

    # cos/sin at positions past the native 1024, through the model's rotary embedding
    pos = torch.tensor([[0, 5, 1023, 1500, 3000, 4095]])
    x = torch.zeros(1, 6, 64)
    cos, sin = rotary(x, pos)
    ang = pos[0, :, None].double() * torch.tensor(inv_ref, dtype=torch.float64)[None]
    ang = torch.cat([ang, ang], -1)
    torch.testing.assert_close(cos[0].double(), ang.cos() * mscale, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sin[0].double(), ang.sin() * mscale, rtol=1e-4, atol=1e-4)
    # interpolation: a slow pair at position 4p turns as it did at p without YaRN
    cos_plain, _ = rotary_default(x[:, :1], torch.tensor([[750]]))
    cos_yarn, _ = rotary(x[:, :1], torch.tensor([[3000]]))
    torch.testing.assert_close(cos_yarn[0, 0, 7] / mscale, cos_plain[0, 0, 7], rtol=1e-4, atol=1e-4)

    # a forward beyond the native length runs, and the setting survives save/load
    ids = torch.randint(0, 190, (1, 1100))
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, 1100, 200)
    model.save_pretrained(tmp_path / "yarn")
    back = VideoFlashForConditionalGeneration.from_pretrained(tmp_path / "yarn")
    assert back.config.text_config.rope_parameters["rope_type"] == "yarn"
    torch.testing.assert_close(back.get_decoder().rotary_emb.inv_freq, torch.tensor(inv_ref), rtol=1e-6, atol=0)

    model.disable_yarn()
    assert tc.max_position_embeddings == 1024 and tc.rope_parameters["rope_type"] == "default"
    torch.testing.assert_close(model.get_decoder().rotary_emb.inv_freq, torch.tensor(theta), rtol=1e-6, atol=0)


def test_yarn_with_a_stated_native_length_and_betas():
    model = tiny_model(seed=0).eval()
    model.enable_yarn(8.0, original_max_position_embeddings=256, beta_fast=16, beta_slow=2)
    inv_ref, mscale = yarn_reference(16, 10000.0, 8.0, 256, beta_fast=16, beta_slow=2)
    rotary = model.get_decoder().rotary_emb
    torch.testing.assert_close(rotary.inv_freq, torch.tensor(inv_ref), rtol=1e-6, atol=0)
    assert rotary.attention_scaling == pytest.approx(mscale)
    assert model.config.text_config.max_position_embeddings == 2048
    with pytest.raises(ValueError, match=">= 1"):
        model.enable_yarn(0.5)


def test_bench_script_runs_and_prints_ratios():
    """The benchmark's plumbing on a very small model (its figures are in docs/PERFORMANCE.md)."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "scripts/bench_long_video.py", "--frames", "8", "16", "--width", "64",
                          "--layers", "4", "--repeat", "1", "--threads", "1"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert "dropout after layers [1, 3]" in lines[0]  # the published schedule scaled to 4 layers
    assert lines[-3].startswith("frames      8: wall x") and "peak memory x" in lines[-2]
    assert lines[-1].startswith("scaling 8 -> 16 frames")
