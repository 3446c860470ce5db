"""The chunked-prefill engine with AdaReTaKe and Video-X²L on a tiny VideoFlash (and a stock
transformers Qwen2-VL and Qwen2.5-VL): without compression it decodes exactly what ``generate`` does on the whole
prompt; with a budget every layer keeps what it was allotted; Video-X²L with every chunk reloaded
is L-KV everywhere; a reused prefill answers as a fresh one."""

from __future__ import annotations

import pytest
import torch

from tests.chat_fixtures import model, tok  # noqa: F401
from tests.inference_helpers import tiny_chat_model
from videoflash.model.chunked_prefill import (
    AdaReTaKe,
    ChunkedPrefillEngine,
    VideoX2L,
    make_policy,
    qwen2_vl_input,
    videoflash_input,
)

PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n{q}<|im_end|>\n"
          "<|im_start|>assistant\n")
FRAMES = 96  # 24 clips of 16 tokens: 384 visual tokens, three chunks of 32 frames
NEW = 8


@pytest.fixture(scope="module")
def embeds():
    # visual tokens with a slowly changing content, so chunks differ from their neighbours
    g = torch.Generator().manual_seed(0)
    base = torch.randn(FRAMES // 4, 1, 64, generator=g).cumsum(0)
    return (base + 0.5 * torch.randn(FRAMES // 4, 16, 64, generator=g)).flatten(0, 1)


def _ids(tok, question="What color is the shape?"):
    return torch.tensor([tok(PROMPT.format(q=question), add_special_tokens=False)["input_ids"]])


def _plain(model, ids, embeds, new=NEW):
    with torch.no_grad():
        out = model.generate(input_ids=ids, video_embeds=embeds, video_frame_counts=torch.tensor([embeds.shape[0] // 4]),
                             max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def _engine(model, ids, embeds, policy):
    inp, dec = videoflash_input(model, ids, embeds, policy.chunk_frames)
    return inp, ChunkedPrefillEngine(dec, policy)


def _adaretake(model, ids, embeds, new=NEW, **kw):
    policy = AdaReTaKe(**kw)
    inp, engine = _engine(model, ids, embeds, policy)
    return engine.generate(engine.prefill(inp), max_new_tokens=new), engine, inp


@pytest.mark.parametrize("positions", ["keep", "reforge"])
def test_budget_above_the_input_decodes_as_the_plain_path(tok, model, embeds, positions):
    ids = _ids(tok)
    out, engine, inp = _adaretake(model, ids, embeds, budget=10**6, positions=positions)
    assert len(inp.chunks()) == 3
    assert out == _plain(model, ids, embeds)
    # nothing was dropped: every layer holds the whole prompt and the tokens fed back
    full = inp.embeds.shape[1] + NEW - 1
    assert [engine.cache.layer_length(i) for i in range(4)] == [full] * 4


def test_budget_above_the_input_with_yarn_and_a_guide_tail(tok, embeds):
    model = tiny_chat_model(tok, seed=3)
    model.enable_yarn(4.0, original_max_position_embeddings=128)  # the prompt runs past 128 positions
    ids = _ids(tok, "Describe what happens in the video in detail please.")
    out, _, _ = _adaretake(model, ids, embeds, budget=10**6, max_guide_length=5, chunk_frames=16)
    assert out == _plain(model, ids, embeds)


def test_one_chunk_with_visual_dropout_decodes_as_the_plain_dropout_path(tok, embeds):
    model = tiny_chat_model(tok, seed=5)
    model.config.set_visual_dropout([2, 3], [0.5, 0.25], ["uniform", "text"], inference=True)
    ids = _ids(tok)
    # one chunk holds the video, the guide is the whole text after it: the chunk's text-guided
    # dropout then sees what the whole-prompt forward sees
    out, engine, inp = _adaretake(model, ids, embeds, budget=10**6, chunk_frames=FRAMES)
    assert out == _plain(model, ids, embeds)
    text = inp.embeds.shape[1] - 384
    assert [engine.cache.layer_length(i) - text - NEW + 1 for i in range(4)] == [384, 384, 192, 96]
    # several chunks: each chunk drops its own share; layers after the drop points hold fewer tokens
    out, engine, inp = _adaretake(model, ids, embeds, budget=10**6)
    assert [engine.cache.layer_length(i) - text - NEW + 1 for i in range(4)] == [384, 384, 192, 96]
    model.config.visual_dropout_in_inference = False


@pytest.mark.parametrize("layers,temporal", [("adakv", "chunk"), ("even", "none"), ("adakv", "frame")])
def test_a_budget_bounds_every_layer_and_the_video(tok, model, embeds, layers, temporal):
    ids = _ids(tok)
    budget = 160
    out, engine, inp = _adaretake(model, ids, embeds, budget=budget, layers=layers, temporal=temporal)
    policy = engine.policy
    total = inp.embeds.shape[1]
    assert policy.ratio == pytest.approx(budget / total)
    assert sum(policy.chunk_ratios) == pytest.approx(policy.ratio * 3, rel=1e-4)
    text = total - 384
    video = []
    for i in range(4):
        alloc = engine.cache.allocations[i]
        assert len(alloc) == 3 and all(1 <= a <= 128 for a in alloc)
        held = engine.cache.layer_length(i) - text - (NEW - 1)
        assert held == sum(alloc)  # the layer holds exactly its allocation of video tokens
        video.append(held)
        if layers == "even":
            for a, r in zip(alloc, policy.chunk_ratios):
                assert a == max(1, int(r * 128))
    assert sum(video) <= 4 * budget * 384 / total + 1e-6  # the video part within the budget, all layers
    if temporal == "chunk":
        assert len(set(round(r, 6) for r in policy.chunk_ratios)) > 1
    assert len(out) == NEW


def test_adakv_gives_layers_different_shares(tok, model, embeds):
    out, engine, _ = _adaretake(model, _ids(tok), embeds, budget=160, temporal="none")
    per_layer = [sum(a) for a in engine.cache.allocations]
    assert len(set(per_layer)) > 1 and sum(per_layer) <= 4 * engine.policy.ratio * 384


def test_reforge_compresses_positions_and_keeps_decoding(tok, model, embeds):
    out, engine, inp = _adaretake(model, _ids(tok), embeds, budget=160, positions="reforge", temporal="none")
    r = engine.policy.ratio
    expected = sum(127 - int(127 * r) for _ in range(3))  # each chunk's span of 128 shrinks to floor(127 r) + 1
    assert engine.offsets == [-expected]
    assert len(out) == NEW
    # the engine starts over on a second prefill
    assert engine.generate(engine.prefill(inp), max_new_tokens=NEW) == out and engine.offsets == [-expected]


def _x2l(model, ids, embeds, **kw):
    policy = VideoX2L(**kw)
    inp, engine = _engine(model, ids, embeds, policy)
    return policy, inp, engine


def test_x2l_with_every_chunk_reloaded_is_l_kv_everywhere(tok, model, embeds):
    ids = _ids(tok)
    policy, inp, engine = _x2l(model, ids, embeds, top_k=3)
    store = engine.prefill_video(inp)
    # the reference: the prefill's own cache (system + every chunk's L-KV), the question run on it
    reference = engine.generate(engine._question(inp, inp.video_end), max_new_tokens=NEW)
    ref_lengths = [engine.cache.layer_length(i) for i in range(4)]
    fresh = ChunkedPrefillEngine(engine.decoder, policy)
    out = fresh.generate(fresh.answer(store, inp), max_new_tokens=NEW)
    assert out == reference
    assert policy.selected == [[0, 1, 2]] * 4
    assert [fresh.cache.layer_length(i) for i in range(4)] == ref_lengths
    text = inp.embeds.shape[1] - 384
    assert ref_lengths == [text + 3 * 64 + NEW - 1] * 4  # alpha_low 2: 64 of each chunk's 128 tokens


def test_x2l_loads_the_rest_as_h_kv_and_reuses_the_prefill(tok, model, embeds):
    policy, inp, engine = _x2l(model, _ids(tok), embeds, top_k=0, alpha_high=32)
    store = engine.prefill_video(inp)
    assert all(kv.device.type == "cpu" for c in store.chunks for pair in c.low + c.high for kv in pair)
    q1 = engine.generate(engine.answer(store, inp), max_new_tokens=NEW)
    text = inp.embeds.shape[1] - 384
    assert policy.selected == [[0, 2]] * 4  # no chunk but the first and last as L-KV
    assert [engine.cache.layer_length(i) for i in range(4)] == [text + 64 + 4 + 64 + NEW - 1] * 4
    # a second question on the reused prefill equals a fresh prefill of that question
    ids2 = _ids(tok, "Where does it move at the end?")
    policy2, inp2, engine2 = _x2l(model, ids2, embeds, top_k=1)
    reused = ChunkedPrefillEngine(engine2.decoder, policy2)
    store2 = reused.prefill_video(inp2)
    first = reused.generate(reused.answer(store2, inp), max_new_tokens=NEW)  # an earlier turn on the store
    assert len(first) == NEW
    again = reused.generate(reused.answer(store2, inp2), max_new_tokens=NEW)
    fresh_policy, fresh_inp, fresh = _x2l(model, ids2, embeds, top_k=1)
    fresh_out = fresh.generate(fresh.answer(fresh.prefill_video(fresh_inp), fresh_inp), max_new_tokens=NEW)
    assert again == fresh_out and policy2.selected == fresh_policy.selected
    assert q1 and store.host_bytes() > 0


def test_x2l_keynorm_a_pooled_prefill_past_and_the_errors(tok, model, embeds):
    policy, inp, engine = _x2l(model, _ids(tok), embeds, score="keynorm", top_k=1)
    out = engine.generate(engine.answer(engine.prefill_video(inp), inp), max_new_tokens=NEW)
    assert len(out) == NEW
    # later chunks may attend to the H-KV of earlier ones: the device holds 4 tokens per chunk
    policy, inp, engine = _x2l(model, _ids(tok), embeds, prefill_past="high")
    store = engine.prefill_video(inp)
    assert [engine.cache.layer_length(i) for i in range(4)] == [inp.video_start + 3 * 4] * 4
    assert len(engine.generate(engine.answer(store, inp), max_new_tokens=NEW)) == NEW
    m = tiny_chat_model(tok, seed=5)
    m.config.set_visual_dropout([2], [0.5], ["text"], inference=True)
    _, inp, engine = _x2l(m, _ids(tok), embeds)
    with pytest.raises(ValueError, match="question-independent"):
        engine.prefill_video(inp)
    with pytest.raises(ValueError, match="expected 'adaretake'"):
        make_policy("snapkv")
    with pytest.raises(ValueError, match="no token budget"):
        make_policy("videox2l", budget=100)
    with pytest.raises(ValueError, match="positive"):
        make_policy("adaretake", budget=0)


# --------------------------------------------------------------------------------------------------
# stock transformers Qwen2-VL / Qwen2.5-VL
# --------------------------------------------------------------------------------------------------


def _tiny_qwen_vl(kind: str):
    """A random Qwen2-VL or Qwen2.5-VL of transformers (3 LLM layers of width 64, a 1-block vision tower)."""
    import transformers

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    common = dict(depth=1, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if kind == "qwen2_vl":
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
        vision = dict(common, embed_dim=32, hidden_size=64)
    else:
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
        vision = dict(common, hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=16,
                      fullatt_block_indexes=[0])
    cfg = config_cls(text_config=text, vision_config=vision, image_token_id=297, video_token_id=298,
                     vision_start_token_id=296, vision_end_token_id=295)
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_a_stock_qwen_vl_decodes_as_its_generate(kind):
    model = _tiny_qwen_vl(kind)
    frames, side = 16, 16  # 8 temporal grids of 4x4 patches -> 2x2 merged: 4 tokens per grid, 32 tokens
    grid = torch.tensor([[frames // 2, side // 4, side // 4]])
    pixels = torch.randn(int(grid.prod()), 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    ids = torch.cat([torch.randint(0, 290, (6,), generator=g), torch.tensor([296]), torch.full((32,), 298),
                     torch.tensor([295]), torch.randint(0, 290, (9,), generator=g)])[None]
    types = (ids == 298).long() * 2
    with torch.no_grad():
        ref = model.generate(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid, mm_token_type_ids=types,
                             max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    ref = ref[0, ids.shape[1]:].tolist()
    for policy in (AdaReTaKe(budget=10**6, chunk_frames=4), VideoX2L(alpha_low=1, alpha_high=1, chunk_frames=4)):
        inp, dec = qwen2_vl_input(model, ids, pixels, grid, chunk_frames=policy.chunk_frames)
        assert inp.positions.shape == (3, ids.shape[1]) and len(inp.chunks()) == 4
        engine = ChunkedPrefillEngine(dec, policy)
        if isinstance(policy, AdaReTaKe):
            logits = engine.prefill(inp)
        else:  # alpha 1: L-KV and H-KV are the chunk's whole KV
            logits = engine.answer(engine.prefill_video(inp), inp)
        assert engine.generate(logits, max_new_tokens=NEW) == ref
    # and under a budget the M-RoPE model compresses and decodes (positions reforged on the time row)
    inp, dec = qwen2_vl_input(model, ids, pixels, grid, chunk_frames=4)
    engine = ChunkedPrefillEngine(dec, AdaReTaKe(budget=30, chunk_frames=4, positions="reforge"))
    assert len(engine.generate(engine.prefill(inp), max_new_tokens=NEW)) == NEW
    assert all(sum(a) < 32 for a in engine.cache.allocations) and engine.offsets[0] < 0


def test_bench_kv_mode_runs_and_prints_the_frame_ratio():
    """The --kv benchmark's plumbing on a very small model (its figures are in docs/PERFORMANCE.md)."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "scripts/bench_long_video.py", "--kv", "--frames", "16", "32", "--width", "64",
                          "--layers", "4", "--threads", "1", "--budget-frames", "8", "--kv-chunk-frames", "8"],
                         capture_output=True, text=True, env=env, cwd=repo, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    rows = [line.split() for line in lines if line.split() and line.split()[0] in ("16", "32")]
    assert [r[1] for r in rows] == ["none", "dropout", "adaretake", "videox2l", "dropout+adaretake"] * 2
    kv = {(r[0], r[1]): float(r[5]) for r in rows}
    assert kv["32", "adaretake"] < kv["32", "none"] and kv["32", "dropout+adaretake"] <= kv["32", "adaretake"]
    assert lines[-1].startswith("frames that fit the KV cache of 8 uncompressed frames: AdaReTaKe >= 32 (x>= 4.00)")


def test_the_gpu_search_doubles_then_bisects(capsys):
    """The frame-count search of the --device cuda path, with an attempt that runs out of memory
    above 5000 frames (the CUDA calls themselves need a GPU this project's tests do not have)."""
    import importlib.util
    import os
    from types import SimpleNamespace

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_long_video.py")
    spec = importlib.util.spec_from_file_location("bench_long_video", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tried = []

    def attempt(n):
        tried.append(n)
        return None if n > 5000 else (n / 1000, n / 100)

    args = SimpleNamespace(start_frames=1024, max_frames=65536, resolution=256)
    fits, fails, timing = bench.search_frames(attempt, "adaretake", args, 16)
    assert tried[:4] == [1024, 2048, 4096, 8192]  # doubling until the first failure
    assert fits <= 5000 < fails and fails - fits <= 256 and fits % 4 == 0
    assert timing == (fits / 1000, fits / 100)
    assert "adaretake: 8192 frames (131072 tokens): OOM" in capsys.readouterr().out
