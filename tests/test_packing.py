"""Packed rows in the model: a packed micro-batch gives the loss and the gradients of its samples run
one by one (the unpacked forward, an independent code path), with visual dropout on or off.

Expectation: for samples j with n_j supervised tokens and unpacked losses L_j (each the mean over
its own tokens), the packed loss is sum_j n_j L_j / sum_j n_j, and its gradient
sum_j n_j grad(L_j) / sum_j n_j.
"""

from __future__ import annotations

import pytest
import torch

from tests.tiny_model import IMAGE_TOKEN, random_frames, tiny_model
from videoflash.model.packing import (
    VARLEN,
    block_diagonal_attention,
    flex_document_attention,
    per_sample_attention,
    varlen_backend,
)

# (layers, ratios, kinds) of the dropout schedules under test
SCHEDULES = {
    "none": None,
    "uniform": ([1, 3], [0.75, 0.25], ["uniform", "uniform"]),
    "text": ([1, 2], [0.5, 0.25], ["text", "text"]),
    "uniform+text": ([1, 3], [0.75, 0.25], ["uniform", "text"]),
}


def _model(schedule, position="compact", seed=0):
    if schedule is None:
        model = tiny_model(seed=seed)
    else:
        layers, ratios, kinds = schedule
        model = tiny_model(seed=seed, visual_dropout_layers=layers, visual_dropout_keep_ratios=ratios,
                           visual_dropout_kinds=kinds, visual_dropout_position=position,
                           visual_dropout_in_training=True, visual_dropout_in_inference=True)
        with torch.no_grad():  # sharper attention, so that text-guided scores spread (no near-ties)
            for i in layers:
                model.get_decoder().layers[i].self_attn.q_proj.weight.mul_(4.0)
    return model.train()


def _samples():
    """Four samples of different lengths and kinds; each is a dict of the unpacked forward's inputs
    for a batch of one, plus ``n`` (its supervised tokens)."""
    g = torch.Generator().manual_seed(11)

    def ids(n):
        return torch.randint(0, 190, (n,), generator=g)

    video = ids(14)
    video[2] = IMAGE_TOKEN
    v_lab = torch.full_like(video, -100)
    v_lab[6:9] = video[6:9]  # two answer spans (multi-turn)
    v_lab[11:14] = video[11:14]
    text = ids(9)
    t_lab = torch.full_like(text, -100)
    t_lab[5:9] = text[5:9]
    image = ids(7)
    image[1] = IMAGE_TOKEN
    i_lab = torch.full_like(image, -100)
    i_lab[4:6] = image[4:6]
    short = ids(6)
    short[0] = IMAGE_TOKEN  # the placeholder first (stage 1's plain format)
    s_lab = torch.full_like(short, -100)
    s_lab[3:6] = short[3:6]
    return [
        dict(input_ids=video, labels=v_lab, frames=random_frames(8, seed=1), n=6),  # 32 visual tokens
        dict(input_ids=text, labels=t_lab, n=4),  # text only
        dict(input_ids=image, labels=i_lab, tiles=random_frames(1, seed=2), n=2),  # 16 visual tokens
        dict(input_ids=short, labels=s_lab, frames=random_frames(4, seed=3), n=3),  # 16 visual tokens
    ]


def _alone(s, labels=True):
    """The unpacked forward's batch of one sample (without labels: the forward gives logits)."""
    batch = dict(input_ids=s["input_ids"][None])
    if labels:
        batch["labels"] = s["labels"][None]
    if "frames" in s:
        batch.update(pixel_values_videos=s["frames"], video_frame_counts=torch.tensor([s["frames"].shape[0]]))
    if "tiles" in s:
        batch.update(pixel_values_images=s["tiles"], image_tile_counts=torch.tensor([1]),
                     image_grids=torch.zeros(1, 2, dtype=torch.long))
    return batch


def _packed(samples, rows):
    """A packed batch: ``rows`` lists the sample indices of each row; rows right-padded."""
    order = [j for row in rows for j in row]
    width = max(sum(samples[j]["input_ids"].numel() for j in row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    lengths = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for k, j in enumerate(row):
            n = samples[j]["input_ids"].numel()
            ids[r, at : at + n] = samples[j]["input_ids"]
            labels[r, at : at + n] = samples[j]["labels"]
            mask[r, at : at + n] = 1
            lengths[r, k] = n
            at += n
    frames = [samples[j]["frames"] for j in order if "frames" in samples[j]]
    tiles = [samples[j]["tiles"] for j in order if "tiles" in samples[j]]
    return dict(
        input_ids=ids, attention_mask=mask, labels=labels, sample_lengths=lengths,
        pixel_values_videos=torch.cat(frames) if frames else None,
        video_frame_counts=torch.tensor([samples[j]["frames"].shape[0] if "frames" in samples[j] else 0 for j in order]),
        pixel_values_images=torch.cat(tiles) if tiles else None,
        image_tile_counts=torch.tensor([1 if "tiles" in samples[j] else 0 for j in order]),
        image_grids=torch.zeros(len(order), 2, dtype=torch.long),
    )


def _grads(model):
    return {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for k, p in model.named_parameters()}


def _expected(schedule, samples, position="compact"):
    """Token-weighted mean of the unpacked losses and gradients, each sample run alone."""
    model = _model(schedule, position)
    total = sum(s["n"] for s in samples)
    loss, grads = 0.0, None
    for s in samples:
        model.zero_grad()
        out = model(**_alone(s))
        out.loss.backward()
        loss += out.loss.item() * s["n"] / total
        g = _grads(model)
        grads = {k: v * s["n"] / total for k, v in g.items()} if grads is None else \
            {k: grads[k] + v * s["n"] / total for k, v in g.items()}
    return loss, grads


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_packed_loss_and_gradients_equal_the_samples_run_alone(name):
    schedule = SCHEDULES[name]
    samples = _samples()
    want_loss, want_grads = _expected(schedule, samples)
    model = _model(schedule)
    out = model(**_packed(samples, [[0, 1], [2, 3]]))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(want_loss, rel=1e-5)
    got = _grads(model)
    for k, want in want_grads.items():
        assert torch.allclose(got[k], want, rtol=1e-4, atol=1e-6), k
    assert any(v.abs().sum() > 0 for k, v in got.items() if k.startswith("vision_tower"))


def test_one_row_holding_every_sample_and_keep_positions():
    schedule = SCHEDULES["uniform+text"]
    samples = _samples()
    want_loss, want_grads = _expected(schedule, samples, position="keep")
    model = _model(schedule, position="keep")
    out = model(**_packed(samples, [[3, 1, 0, 2]]))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(want_loss, rel=1e-5)
    got = _grads(model)
    for k, want in want_grads.items():
        assert torch.allclose(got[k], want, rtol=1e-4, atol=1e-6), k


def _logits_by_sample(model, samples, rows, dropout=False):
    """The packed forward's logits cut back into samples (no dropout: the flat layout is the samples'
    spliced sequences end to end)."""
    batch = _packed(samples, rows)
    batch.pop("labels")  # with labels the forward returns the loss only
    with torch.no_grad():
        logits = model(**batch).logits[0]
    out, at = {}, 0
    for j in [j for row in rows for j in row]:
        n = samples[j]["input_ids"].numel()
        n += (16 * samples[j]["frames"].shape[0] // 4 - 1) if "frames" in samples[j] else 0
        n += 15 if "tiles" in samples[j] else 0
        out[j] = logits[at : at + n]
        at += n
    assert at == logits.shape[0]
    return out


def test_attention_never_crosses_a_sample():
    # a sample's logits do not depend on its neighbours: change every token of sample 1 and the
    # logits of samples 0 and 2 (packed around it) stay as they were, equal to the sample alone
    model = _model(None).eval()
    samples = _samples()
    before = _logits_by_sample(model, samples, [[0, 1, 2]])
    other = [dict(s) for s in samples]
    other[1]["input_ids"] = (samples[1]["input_ids"] + 7) % 190
    after = _logits_by_sample(model, other, [[0, 1, 2]])
    for j in (0, 2):
        assert torch.allclose(before[j], after[j], atol=1e-5)
        with torch.no_grad():
            alone = model(**_alone(samples[j], labels=False)).logits[0]
        assert torch.allclose(before[j], alone, atol=1e-5)
    assert not torch.allclose(before[1], after[1])


def test_varlen_implementation_equals_the_block_diagonal_mask():
    # the registered packed_varlen attention takes the cumulative lengths through the HF layers
    samples = _samples()
    batch = _packed(samples, [[0, 1], [2, 3]])
    model = _model(SCHEDULES["uniform+text"])
    dense = model(**batch)
    dense.loss.backward()
    want = _grads(model)
    model.zero_grad()
    model.set_attn_implementation(VARLEN)
    assert model.language_model.config._attn_implementation == VARLEN
    varlen = model(**batch)
    varlen.loss.backward()
    assert varlen.loss.item() == pytest.approx(dense.loss.item(), rel=1e-6)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        dense_logits = model(**unlabelled).logits
        model.set_attn_implementation(VARLEN)
        assert torch.allclose(model(**unlabelled).logits, dense_logits, atol=1e-5)
    for k, g in _grads(model).items():
        assert torch.allclose(g, want[k], rtol=1e-4, atol=1e-6), k
    # unpacked batches (and decoding) go through SDPA with their own masks, unchanged
    alone = _alone(samples[0], labels=False)
    with torch.no_grad():
        a = model(**alone).logits
        model.set_attn_implementation("sdpa")
        b = model(**alone).logits
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # its eager reference, on purpose
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_flex_document_mask_and_block_diagonal_equal_each_sample_alone(kv_heads):
    # the kernels of a packed sequence against causal SDPA on each sample by itself; FlexAttention
    # runs its eager reference on CPU (forward only)
    g = torch.Generator().manual_seed(5)
    lengths = [7, 1, 12, 5]
    total = sum(lengths)
    q = torch.randn(total, 4, 16, generator=g)
    k = torch.randn(total, kv_heads, 16, generator=g)
    v = torch.randn(total, kv_heads, 16, generator=g)
    cu = torch.tensor([0, 7, 8, 20, 25], dtype=torch.int32)
    pieces = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)
        ks, vs = ks.repeat_interleave(4 // kv_heads, 0), vs.repeat_interleave(4 // kv_heads, 0)
        pieces.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
    want = torch.cat(pieces)
    assert torch.allclose(block_diagonal_attention(q, k, v, cu, 0.25), want, atol=1e-5)
    assert torch.allclose(flex_document_attention(q, k, v, cu, 0.25, compiled=False), want, atol=1e-5)
    assert torch.allclose(per_sample_attention(q, k, v, cu, 0.25), want, atol=1e-5)
    assert varlen_backend(q.device) == "sdpa_per_sample"


def test_packed_batch_errors_are_clear():
    model = _model(None)
    samples = _samples()
    batch = _packed(samples, [[0, 1]])
    bad = dict(batch, sample_lengths=torch.tensor([[14, 8]]))
    with pytest.raises(ValueError, match="sample_lengths sum to 22"):
        model(**bad)
    with pytest.raises(ValueError, match="KV cache"):
        model.eval()(**batch, use_cache=True)
