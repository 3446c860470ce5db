"""The memory-bounded training paths against the unchunked computation: the chunked linear
cross-entropy (loss and gradients) and the vision tower run a few clips per call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.tiny_model import IMAGE_TOKEN, random_frames, tiny_model
from videoflash.model.chunked_loss import lm_cross_entropy

IGNORE = -100


def _full_path(hidden, weight, labels, bias=None):
    """Today's path: all logits, then F.cross_entropy with ignore_index."""
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, ignore_index=IGNORE)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_cross_entropy_equals_the_full_path(chunk, with_bias):
    g = torch.Generator().manual_seed(0)
    n, h, v = 53, 16, 37  # 7 does not divide the supervised count
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = IGNORE

    want = _full_path(hidden, weight, labels, bias)
    gw = torch.autograd.grad(want * 2.5, [hidden, weight] + ([bias] if with_bias else []))
    keep = labels != IGNORE
    got = lm_cross_entropy(hidden[keep], weight, labels[keep], bias, chunk_size=chunk)
    gg = torch.autograd.grad(got * 2.5, [hidden, weight] + ([bias] if with_bias else []))
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-6)  # both sum float32 logits
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b)
    assert torch.count_nonzero(gg[0][~keep]) == 0  # ignored positions get no gradient


def test_no_supervised_token_gives_a_zero_in_the_graph():
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    loss = lm_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and weight.grad is not None and torch.count_nonzero(weight.grad) == 0


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 190, (2, 30), generator=g)
    ids[:, 3] = IMAGE_TOKEN
    mask = torch.ones_like(ids)
    mask[1, 24:] = 0
    labels = torch.full_like(ids, IGNORE)
    labels[0, 10:20] = ids[0, 10:20]
    labels[0, 25:30] = ids[0, 25:30]
    labels[1, 12:24] = ids[1, 12:24]
    return dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values_videos=random_frames(20),
                video_frame_counts=torch.tensor([12, 8]))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_model_loss_and_gradients_equal_the_full_logits_path():
    """The model's chunked loss (chunk 3: not a divisor of the 27 supervised tokens) against the
    full logits of the same model (no labels), shifted and F.cross_entropy'd by hand."""
    model = tiny_model(loss_chunk_size=3).train()
    batch = _batch()
    out = model(**batch)
    out.loss.backward()
    got = _grads(model)
    model.zero_grad()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, dropout_query_positions=None).logits  # [2, T', V] after splicing
    # the spliced labels: the placeholder at 3 becomes 48 (32) visual tokens
    spliced = torch.full(logits.shape[:2], IGNORE)
    for b, shift in ((0, 47), (1, 31)):
        sel = batch["labels"][b] != IGNORE
        idx = torch.nonzero(sel)[:, 0]
        spliced[b, idx + shift] = batch["labels"][b, idx]
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), spliced[:, 1:].flatten(), ignore_index=IGNORE)
    want.backward()
    ref = _grads(model)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("per_call", [1, 2])
def test_vision_in_chunks_equals_one_call_with_the_same_gradients(per_call):
    batch = _batch()
    ref_model = tiny_model().train()
    ref_model(**batch).loss.backward()
    ref = _grads(ref_model)
    model = tiny_model(vision_clips_per_call=per_call).train()
    calls = []
    model.vision_tower.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    loss = model(**batch).loss
    assert torch.isclose(loss, ref_model(**batch).loss, rtol=1e-5)
    forward_calls = list(calls)
    loss.backward()
    # 5 clips, per_call at a time, then the image dummy (one tile); backward recomputes each chunk
    chunks = [min(per_call, 5 - i) for i in range(0, 5, per_call)]
    assert forward_calls == chunks + [1]
    assert sorted(calls[len(forward_calls):]) == sorted(chunks)
    got = _grads(model)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_vision_calls_pad_to_the_ranks_common_count():
    """A rank with fewer clips runs dummy chunks up to ``vision_calls`` (ZeRO-3: same calls on all ranks)
    and computes the same loss."""
    batch = _batch()
    model = tiny_model(vision_clips_per_call=2).train()
    want = model(**batch).loss
    calls = []
    model.vision_tower.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    assert model.vision_calls_needed(20) == 3
    got = model(**batch, vision_calls=6).loss
    assert calls == [2, 2, 1, 1, 1, 1, 1]  # 3 real chunks, 3 dummy clips, the image dummy
    torch.testing.assert_close(got, want)
    calls.clear()
    ids = batch["input_ids"].clone()
    ids[:, 3] = 5
    model(input_ids=ids, labels=ids, vision_calls=4).loss.backward()  # text only: dummy clips too
    assert calls[:4] == [1, 1, 1, 1] and len(calls) >= 5
