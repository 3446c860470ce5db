"""The pure functions of videoflash.model.kv_compression against brute force and hand-worked cases."""

from __future__ import annotations

import math

import pytest
import torch

from videoflash.model.kv_compression import (
    chunk_relevance,
    compress_positions,
    frame_distance_ratios,
    key_norm_scores,
    layer_ratios,
    pool_kv,
    prompt_scores,
    rerotate,
    self_scores,
    temporal_ratios,
    topk_sorted,
    water_fill,
)


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [x / s for x in e]


def test_prompt_scores_by_loops():
    g = torch.Generator().manual_seed(0)
    H, Hkv, P, n, d = 6, 2, 3, 5, 4
    q = torch.randn(H, P, d, generator=g)
    k = torch.randn(Hkv, n, d, generator=g)
    groups = H // Hkv
    expected = [0.0] * n
    for kv in range(Hkv):
        for h in range(kv * groups, (kv + 1) * groups):  # query head h reads KV head h // groups
            for p in range(P):
                logits = [sum(float(q[h, p, i] * k[kv, j, i]) for i in range(d)) / math.sqrt(d) for j in range(n)]
                for j, a in enumerate(_softmax(logits)):
                    expected[j] += a / groups / Hkv
    got = prompt_scores(q, k)
    assert got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert float(got.sum()) == pytest.approx(P)  # each query's softmax sums to one


def test_self_scores_and_key_norm_scores():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 6, 8, generator=g)
    k = torch.randn(2, 6, 8, generator=g)
    # self-attention scores are the prompt scores of the chunk's own queries, in any head blocking
    torch.testing.assert_close(self_scores(q, k, block=1), prompt_scores(q, k))
    torch.testing.assert_close(self_scores(q, k, block=3), prompt_scores(q, k))
    # key norms: a hand-made case, token 1 has the smallest keys
    keys = torch.tensor([[[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]], [[0.0, 5.0], [1.0, 0.0], [0.0, 10.0]]])
    torch.testing.assert_close(key_norm_scores(keys), torch.tensor([-5.0, -1.0, -10.0]))
    assert topk_sorted(key_norm_scores(keys), 2).tolist() == [0, 1]


def test_topk_sorted_keeps_temporal_order():
    s = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.05])
    assert topk_sorted(s, 3).tolist() == [1, 2, 3]
    assert topk_sorted(s, 10).tolist() == [0, 1, 2, 3, 4]
    assert topk_sorted(s, 0).tolist() == []


def test_layer_ratios_hand_worked():
    # 2 layers of 4 tokens, ratio 0.5: B = int(max(1, 2) * 2) = 4; the 4 highest are 9, 8, 7 (layer 0)
    # and 6 (layer 1): counts 3 and 1; r = 2 * 0.5 * (4, 2) / 6 = (2/3, 1/3)
    scores = torch.tensor([[9.0, 1.0, 8.0, 7.0], [0.5, 6.0, 0.2, 0.1]])
    torch.testing.assert_close(layer_ratios(scores, 0.5), torch.tensor([2 / 3, 1 / 3]))


def test_layer_ratios_by_brute_force_counting():
    g = torch.Generator().manual_seed(2)
    for L, n, r in ((3, 10, 0.3), (5, 7, 0.05), (4, 16, 0.9)):
        scores = torch.rand(L, n, generator=g)
        budget = int(max(1, r * n) * L)
        threshold = sorted(scores.flatten().tolist(), reverse=True)[budget - 1]
        counts = [sum(1 for x in row if x >= threshold) + 1 for row in scores.tolist()]
        expected = [L * r * c / sum(counts) for c in counts]
        got = layer_ratios(scores, r)
        torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-6)
        assert float(got.mean()) == pytest.approx(r, rel=1e-5)
        assert float(got.max()) < 1.0


def _exact_projection(q, total, lo, hi):
    """The shift mu with sum(clip(q - mu, lo, hi)) = total, from the breakpoints of the piecewise
    linear sum (an independent algorithm from the bisection)."""
    points = sorted({x - lo for x in q} | {x - hi for x in q})

    def f(mu):
        return sum(min(max(x - mu, lo), hi) for x in q)

    for a, b in zip(points, points[1:]):
        fa, fb = f(a), f(b)
        if fb <= total <= fa and fa != fb:
            mu = a + (fa - total) / (fa - fb) * (b - a)
            return [min(max(x - mu, lo), hi) for x in q]
    raise AssertionError("no breakpoint interval holds the total")


def test_water_fill_matches_the_exact_projection():
    g = torch.Generator().manual_seed(3)
    for m, total in ((5, 1.5), (8, 0.8), (12, 6.0)):
        raw = torch.rand(m, generator=g) ** 3
        got = water_fill(raw, total)
        q = (raw / raw.sum() * total).tolist()
        expected = _exact_projection(q, total, 1e-3, 1.0)
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), rtol=1e-4, atol=1e-4)
        assert float(got.sum()) == pytest.approx(total, abs=1e-4)
        assert float(got.min()) >= 1e-3 - 1e-7 and float(got.max()) <= 1.0 + 1e-7
    # totals at or past the box give the bound
    assert water_fill(torch.rand(4), 4.0).tolist() == [1.0] * 4


def test_temporal_ratios_hand_worked():
    # chunks 0 and 1 alike, chunk 2 orthogonal: d = (0, 1/2, 1/2)... edge padding makes
    # d_0 = (0 + 0)/2 = 0, d_1 = (0 + 1)/2, d_2 = (1 + 0)/2; raw = r d / mean(d) = 0.3 * (0, 1.5, 1.5)
    c = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    got = temporal_ratios(c, 0.3)
    # sum must stay 0.9 with the first chunk raised to the 1e-3 floor: mu = 0.0005
    torch.testing.assert_close(got, torch.tensor([1e-3, 0.45 - 0.0005, 0.45 - 0.0005]), rtol=1e-4, atol=1e-5)
    assert float(got.sum()) == pytest.approx(0.9, abs=1e-4)
    # a big ratio: the dynamic chunks are capped at 1 and the rest goes to the static one
    got = temporal_ratios(c, 0.8)
    torch.testing.assert_close(got, torch.tensor([0.4, 1.0, 1.0]), rtol=1e-4, atol=1e-4)
    # no compression, one chunk, identical chunks: the base ratio everywhere
    assert temporal_ratios(c, 1.0).tolist() == [1.0] * 3
    assert temporal_ratios(c[:1], 0.2).tolist() == [pytest.approx(0.2)]
    assert temporal_ratios(torch.ones(4, 3), 0.25).tolist() == [pytest.approx(0.25)] * 4


def test_frame_distance_ratios_hand_worked():
    # chunk 0: 2 identical frames (distance 0); chunk 1: 2 orthogonal frames (distance 1)
    static = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    moving = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    got = frame_distance_ratios([static, moving], 0.4)  # raw (0, 0.8); floor moves 0.001 over
    torch.testing.assert_close(got, torch.tensor([1e-3, 0.8 - 1e-3]), rtol=1e-4, atol=1e-5)


def test_chunk_relevance_by_hand():
    # 4 query heads, 2 KV heads, d = 2; query heads 0,1 read KV head 0, heads 2,3 read KV head 1
    q = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]],
                      [[0.0, 1.0], [0.0, 3.0]], [[0.0, 2.0], [0.0, 2.0]]])  # means: e1, e1, 2e2, 2e2
    aligned = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 4.0], [0.0, 0.0]]])  # means e1, 2e2
    crossed = torch.tensor([[[0.0, 2.0]], [[4.0, 0.0]]])  # means 2e2, 4e1
    got = chunk_relevance(q, [aligned, crossed])
    qv = torch.tensor([1.0, 0, 1, 0, 0, 2, 0, 2])
    kv0 = torch.tensor([1.0, 0, 1, 0, 0, 2, 0, 2])
    kv1 = torch.tensor([0.0, 2, 0, 2, 4, 0, 4, 0])
    expected = [float(qv @ kv0 / qv.norm() / kv0.norm()), float(qv @ kv1 / qv.norm() / kv1.norm())]
    torch.testing.assert_close(got, torch.tensor(expected))
    assert expected == [pytest.approx(1.0), 0.0]


def test_pool_kv_means_runs_of_tokens():
    x = torch.arange(2 * 7 * 3, dtype=torch.float32).view(2, 7, 3)
    out = pool_kv(x, 3)
    assert out.shape == (2, 3, 3)
    for h in range(2):
        for i, (a, b) in enumerate(((0, 3), (3, 6), (6, 7))):
            torch.testing.assert_close(out[h, i], x[h, a:b].mean(0))
    torch.testing.assert_close(pool_kv(x, 1), x)
    assert pool_kv(x, 32).shape == (2, 1, 3)
    with pytest.raises(ValueError, match="stride"):
        pool_kv(x, 0)


def test_rerotate_moves_keys_between_positions():
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

    for rope in ({"rope_type": "default", "rope_theta": 10000.0},
                 {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}):
        cfg = Qwen2Config(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, rope_parameters=rope,
                          max_position_embeddings=256)
        rotary = Qwen2RotaryEmbedding(cfg)
        raw = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))
        old_pos, new_pos = torch.tensor([[3, 9, 10, 40, 41]]), torch.tensor([[3, 5, 5, 20, 20]])
        old = rotary(raw, old_pos)
        new = rotary(raw, new_pos)
        at_old, _ = apply_rotary_pos_emb(raw[None], raw[None], *old)
        at_new, _ = apply_rotary_pos_emb(raw[None], raw[None], *new)
        moved = rerotate(at_old[0], (old[0][0], old[1][0]), (new[0][0], new[1][0]), rotary.attention_scaling)
        torch.testing.assert_close(moved, at_new[0], rtol=1e-4, atol=1e-5)


def test_compress_positions():
    t = torch.tensor([10, 11, 12, 13, 17])
    assert compress_positions(t, 10, 0.5).tolist() == [10, 10, 11, 11, 13]
    assert compress_positions(t, 10, 1.0).tolist() == t.tolist()
