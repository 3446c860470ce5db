"""Visual-token dropout follows VideoChat-Flash's own arithmetic (``flash_rank_drop``).

Each expectation is the reference's rule written out here, independently of videoflash's code:
counts ``int(N * r)``, uniform indices as torch's integer linspace computes them (from both ends,
truncated), text-guided picks with QK^T and the means in the model's dtype, and a sample without an
answer span left undropped while the rest of its batch drops.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.tiny_model import IMAGE_TOKEN, random_frames, tiny_model
from videoflash.model.visual_dropout import keep_count, uniform_keep


def _linspace_long(n: int, k: int) -> list[int]:
    """Integer linspace(0, n - 1, k) as torch's CPU kernel computes it: a double step, the first half
    counted from the start and the second half from the end, each value truncated."""
    step = (n - 1) / (k - 1)
    return [int(step * i) if i < k // 2 else int((n - 1) - step * (k - 1 - i)) for i in range(k)]


@pytest.mark.parametrize(("n", "ratio", "expected"), [(256, 0.3, 76), (33, 0.5, 16), (37, 0.25, 9), (1024, 0.75, 768)])
def test_keep_count_truncates(n, ratio, expected):
    assert keep_count(n, ratio) == expected


def test_uniform_indices_truncate_like_the_reference():
    # a worked case: linspace(0, 15, 12) = 0, 1.36, 2.73, 4.09, 5.45, 6.82, 8.18, 9.55, 10.9, 12.3, 13.6, 15
    assert uniform_keep(16, 12).tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 15]
    for n, k in ((1024, 768), (4096, 3072), (768, 256), (8192, 2048), (64, 48)):
        assert uniform_keep(n, k).tolist() == _linspace_long(n, k), (n, k)
    # the published setting (keep 0.75 at 64 frames): rounding would move 383 of the 768 picks
    rounded = [math.floor(x + 0.5) for x in (i * 1023 / 767 for i in range(768))]
    assert sum(a != b for a, b in zip(uniform_keep(1024, 768).tolist(), rounded)) == 383
    assert uniform_keep(5, 8).tolist() == list(range(5)) and uniform_keep(5, 0).numel() == 0


def _rope_tables(positions: torch.Tensor, dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ang = positions.float()[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


def _reference_text_pick(layer, hidden, queries, span, keep, heads, kv_heads, theta=10000.0):
    """The reference's text-guided pick for one sample, in the dtype of ``hidden`` ([L, D]):
    projections of the whole sequence, RoPE, QK^T / sqrt(d) plus the additive causal mask, softmax
    in float32 cast back, mean over heads, the visual span, mean over queries, top-k, sorted."""
    dtype = hidden.dtype
    length = hidden.shape[0]
    attn = layer.self_attn
    xn = layer.input_layernorm(hidden[None])[0]
    d = attn.head_dim
    q = F.linear(xn, attn.q_proj.weight, attn.q_proj.bias).view(length, heads, d).transpose(0, 1)
    k = F.linear(xn, attn.k_proj.weight, attn.k_proj.bias).view(length, kv_heads, d).transpose(0, 1)
    cos, sin = _rope_tables(torch.arange(length), d, theta, dtype)
    q, k = q * cos + _rotate(q) * sin, k * cos + _rotate(k) * sin
    k = k.repeat_interleave(heads // kv_heads, 0)
    mask = torch.zeros(length, length, dtype=dtype).masked_fill(
        torch.ones(length, length, dtype=torch.bool).triu(1), torch.finfo(dtype).min)
    w = torch.matmul(q[:, queries], k.transpose(1, 2)) / math.sqrt(d) + mask[queries]
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(dtype)
    per_query = w.mean(0)[:, span[0]: span[1]]
    return per_query.mean(0).topk(keep).indices.sort().values.tolist()


def _capture(model):
    before, after = {}, {}
    layers = model.get_decoder().layers
    layers[0].register_forward_hook(lambda m, a, kw, out: before.setdefault("h", out.detach().clone()), with_kwargs=True)
    layers[1].register_forward_pre_hook(
        lambda m, a, kw: after.update(h=a[0].detach().clone(), mask=kw["attention_mask"]), with_kwargs=True)
    return before, after


def _kept(before_row, after_row, start, count, kept):
    """Indices (within the visual span) of the rows of ``after_row`` that were visual rows before."""
    return [next(j for j in range(start, start + count) if torch.equal(before_row[j], r)) - start
            for r in after_row[start: start + kept]]


def _text_model(dtype):
    model = tiny_model(seed=2, visual_dropout_layers=[1], visual_dropout_keep_ratios=[0.5],
                       visual_dropout_kinds=["text"], visual_dropout_in_training=True,
                       visual_dropout_in_inference=True).train()
    with torch.no_grad():  # sharper attention, so that the scores spread
        model.get_decoder().layers[1].self_attn.q_proj.weight.mul_(4.0)
    return model.to(dtype)


def test_text_guided_picks_are_computed_in_the_models_dtype():
    model = _text_model(torch.bfloat16)
    before, after = _capture(model)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 190, (1, 12), generator=g)
    ids[0, 1] = IMAGE_TOKEN
    labels = torch.full_like(ids, -100)
    labels[0, 6:9] = ids[0, 6:9]  # one answer span, after text token 5
    model(input_ids=ids, labels=labels, pixel_values_videos=random_frames(16, seed=4),
          video_frame_counts=torch.tensor([16]))  # 64 visual tokens at 1..64
    hidden = before["h"][0]
    layer = model.get_decoder().layers[1]
    expected = _reference_text_pick(layer, hidden, [5 + 63], (1, 65), 32, heads=4, kv_heads=2)
    assert _kept(hidden, after["h"][0], 1, 64, 32) == expected
    # the same rule in float32 picks otherwise here: the dtype is what decides these ties
    in_fp32 = _reference_text_pick(layer.float(), hidden.float(), [5 + 63], (1, 65), 32, heads=4, kv_heads=2)
    assert in_fp32 != expected


def test_a_sample_without_an_answer_span_is_not_dropped_and_the_others_are():
    model = _text_model(torch.float32)
    before, after = _capture(model)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 190, (2, 12), generator=g)
    ids[:, 1] = IMAGE_TOKEN
    labels = torch.full_like(ids, -100)
    labels[0, 6:9] = ids[0, 6:9]  # sample 0 answers after text token 5; sample 1 has no answer
    model(input_ids=ids, labels=labels, pixel_values_videos=random_frames(16, seed=4),
          video_frame_counts=torch.tensor([8, 8]))  # 32 visual tokens each, at 1..32
    hidden = before["h"]
    mask = after["mask"]
    # sample 1 keeps its 11 text + 32 visual tokens, sample 0 its 11 text + 16 visual
    real = [(mask[b, 0, -1] == 0).sum().item() if mask is not None else after["h"].shape[1] for b in range(2)]
    assert real == [11 + 16, 11 + 32]
    assert torch.equal(after["h"][1, :43], hidden[1, :43])
    layer = model.get_decoder().layers[1]
    expected = _reference_text_pick(layer, hidden[0], [5 + 31], (1, 33), 16, heads=4, kv_heads=2)
    assert _kept(hidden[0], after["h"][0], 1, 32, 16) == expected
