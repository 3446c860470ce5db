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


def test_without_a_backward_only_the_loss_is_computed():
    """Under no_grad (evaluation with labels) the loss is the full path's, and the head's matmuls are
    the logits' alone: no gradient ``[N, V] @ [V, h]`` computed ahead for a backward that never comes."""
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(1)
    n, h, v = 10, 8, 24
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        got = lm_cross_entropy(hidden, weight, labels, chunk_size=3)
    assert fc.get_total_flops() == 2 * n * h * v
    torch.testing.assert_close(got, _full_path(hidden, weight, labels).detach())
    assert not got.requires_grad


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


# --------------------------------------------------------------------------------------------------
# the train room: config keys, and the ranks agreeing on a common number of vision calls
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [("model.loss_chunk_size=0", "model.loss_chunk_size"),
                                           ("model.vision_clips_per_call=-1", "model.vision_clips_per_call")])
def test_bad_memory_bounds_name_the_key(override, key):
    from hydra.errors import ConfigCompositionException

    from videoflash.config import ConfigError, compose, validate

    with pytest.raises(ConfigError) as err:
        validate(compose([override]))
    assert err.value.key == key
    with pytest.raises(ConfigCompositionException, match=key.replace(".", r"\.")):  # typed by the schema
        compose([f"{key}=two"])


def test_memory_bound_defaults_of_the_presets():
    from videoflash.config import compose, validate

    for preset, per_call in (("tiny", 0), ("umtl_qwen25_1p5b_448", 16), ("umtl_qwen2_7b_224", 16)):
        m = validate(compose([f"model={preset}"])).model
        assert (m.loss_chunk_size, m.vision_clips_per_call) == (4096, per_call), preset
    m = validate(compose(["model.vision_clips_per_call=3", "model.loss_chunk_size=17"])).model
    assert (m.loss_chunk_size, m.vision_clips_per_call) == (17, 3)


VISION_CALLS_PROBE = r'''
import json, sys
import torch
from videoflash.config import compose, validate
from videoflash.data.collate import Sample, collate
from videoflash.train import distributed
from videoflash.train.trainer import Trainer

out, overrides = sys.argv[1], sys.argv[2:]
raw = compose(overrides)
trainer = Trainer(validate(raw), raw)
trainer.setup()
config = trainer.model.config
size, per_clip = config.image_size, config.tokens_per_clip

def sample(key, frames, g):
    """12 text tokens around the placeholder (or none: text only), the last 4 supervised."""
    ids = torch.randint(10, 700, (13 if frames else 12,), generator=g)
    if frames:
        ids[4] = config.image_token_id
    labels = torch.full_like(ids, -100)
    labels[-4:] = ids[-4:]
    video = torch.randint(0, 256, (frames, size, size, 3), generator=g, dtype=torch.uint8) if frames else None
    return Sample(key=key, source="probe", input_ids=ids, labels=labels, frames=video,
                  num_visual_tokens=frames // 4 * per_clip, num_text_tokens=12)

# rank 0's micro-batches hold 5 clips (3 calls of 2), rank 1's one clip and a text-only sample (1 call)
frames = [(12, 8), (4, 0)][trainer.rank]
g = torch.Generator().manual_seed(100 + trainer.rank)
trainer.batches = iter([collate([sample(f"{trainer.rank}-{s}-{i}", f, g) for i, f in enumerate(frames)],
                                trainer.tokenizer.pad_token_id, size) for s in range(3)])
calls = []
trainer.model.vision_tower.register_forward_hook(lambda m, i, o: calls.append(int(i[0].shape[0])))
rc = trainer.fit()
trainer.close()
with open(f"{out}.rank{trainer.rank}", "w") as f:
    json.dump({"rc": rc, "calls": calls, "per_call": config.vision_clips_per_call}, f)
distributed.shutdown()
'''


@pytest.mark.slow
def test_zero3_ranks_with_different_clip_counts_agree_on_vision_calls(tmp_path, tiny_overrides, ds_env):
    """Two ZeRO-3 ranks over gloo, rank 0 with 5 clips per micro-batch and rank 1 with 1, encode 2
    clips per call: the trainer's all-reduce makes rank 1 pad to rank 0's 3 calls (the same module
    calls on both ranks, so ZeRO-3's collective gathers match and nothing hangs), and the per-step
    losses are those of the same run with every clip in one call."""
    import json
    import math
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    probe = tmp_path / "probe.py"
    probe.write_text(VISION_CALLS_PROBE)
    env = dict(ds_env, PYTHONPATH=str(repo))
    runs = {}
    for per_call in (0, 2):
        run_root = tmp_path / f"k{per_call}"
        out = tmp_path / f"k{per_call}.json"
        args = ["stage=2", "stage.init=parts", f"model.vision_clips_per_call={per_call}",
                *tiny_overrides(run_root, steps=3, extra=["train.activation_checkpointing=true"])]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(probe),
               str(out), *args]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500, cwd=repo)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        reports = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
        assert all(r["rc"] == 0 and r["per_call"] == per_call for r in reports)
        rows = [json.loads(line) for line in (run_root / "stage2" / "metrics.jsonl").read_text().splitlines() if line]
        runs[per_call] = ({r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}, reports)

    one_call, one_reports = runs[0]
    chunked, reports = runs[2]
    # one call: each forward encodes the rank's clips at once, then the image dummy; backward
    # recomputes nothing outside the blocks' own checkpoints
    assert [c for c in one_reports[0]["calls"]][:2] == [5, 1] and one_reports[1]["calls"][:2] == [1, 1]
    # 2 clips per call: rank 0 runs chunks of 2, 2, 1; rank 1 its one clip and 2 dummy clips; both
    # recompute each chunk in the backward: the same number of encoder calls on both ranks
    assert reports[0]["calls"][:4] == [2, 2, 1, 1] and reports[1]["calls"][:4] == [1, 1, 1, 1]
    assert len(reports[0]["calls"]) == len(reports[1]["calls"]) == 3 * (4 + 3)
    assert sorted(one_call) == sorted(chunked) == [1, 2, 3]
    for step in one_call:
        assert math.isclose(chunked[step], one_call[step], rel_tol=1e-4), (step, chunked[step], one_call[step])


def test_the_benchmarks_memory_accounting_on_hand_counted_allocations():
    """scripts/bench_memory.py's LiveBytes against bytes counted by hand: new storages count once
    (views and in-place results share them), freed ones are subtracted, inputs never count."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_memory.py"
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    given = torch.ones(1000)  # 4000 bytes, there before
    tracker = bench.LiveBytes().ignore([given])
    with tracker:
        view = given[:10]  # a view of an input: nothing new
        a = torch.empty(1000)  # +4000
        a.add_(1.0)  # in place: nothing new
        b = a.view(10, 100).t()  # a view: nothing new
        c = torch.empty(500, dtype=torch.float64)  # +4000 -> 8000 alive, the peak
        del a, b  # -4000
        d = torch.empty(100)  # +400
        assert tracker.live == 4400
    assert tracker.peak == 8000 and view.shape == (10,) and c.numel() + d.numel() == 600
