"""Sequence parallelism (DeepSpeed-Ulysses, ``train.sequence_parallel``) against the unsplit computation.

- Two processes over gloo, one sequence-parallel group of 2, real DeepSpeed (ZeRO-3 and ZeRO-1, with
  ``mpu`` = DeepSpeed's sequence-parallel groups): one forward/backward of a tiny model on a batch of
  two video samples with visual dropout on (uniform after layer 1, text-guided after layer 2) gives
  the loss and every parameter's full gradient of ONE process that
  runs the same batch without sequence parallelism, in this test's own process.
- A training run of the engine with ``train.sequence_parallel=2`` on 2 ranks (ZeRO-3, activation
  checkpointing, text-guided dropout in training), stopped with a checkpoint and resumed, has the
  per-step losses of the same run on one rank (the gradients themselves are compared above: AdamW
  would hide a wrong gradient scale from the losses).
- Settings it cannot run with stop with an error naming ``train.sequence_parallel``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny_model import IMAGE_TOKEN, random_frames, tiny_model

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# the case: a tiny 4-layer model (4 heads, 2 KV heads) and a batch of two video samples
# --------------------------------------------------------------------------------------------------
def sp_model():
    model = tiny_model(seed=0, visual_dropout_layers=[1, 2], visual_dropout_keep_ratios=[0.75, 0.5],
                       visual_dropout_kinds=["uniform", "text"], visual_dropout_in_training=True)
    return model.train()


def sp_batch() -> dict[str, torch.Tensor]:
    """Two right-padded samples: 5 + <image> + 12 text tokens with 8 frames (32 visual tokens), and
    7 + <image> + 6 with 4 frames (16); the last 4 tokens of each are the supervised answer. After
    splicing the rows hold 49 tokens, after the drops 41 and 33: odd, so the split pads."""
    g = torch.Generator().manual_seed(1)
    shapes = [(5, 12), (7, 6)]
    length = max(a + 1 + b for a, b in shapes)
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    labels = torch.full((2, length), -100)
    for i, (a, b) in enumerate(shapes):
        row = torch.randint(1, IMAGE_TOKEN - 1, (a + 1 + b,), generator=g)
        row[a] = IMAGE_TOKEN
        ids[i, : row.numel()] = row
        mask[i, : row.numel()] = 1
        labels[i, row.numel() - 4 : row.numel()] = row[-4:]
    return dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values_videos=random_frames(12, seed=3),
                video_frame_counts=torch.tensor([8, 4]))


PROBE = r'''
import sys
import deepspeed, torch
from deepspeed.utils import safe_get_full_grad
from videoflash.config.schema import DeepSpeedSchema
from videoflash.train import distributed, ds_config, sequence_parallel as seqpar
from tests.test_sequence_parallel import sp_batch, sp_model

out = sys.argv[1]
info = distributed.detect()
distributed.init(info, "gloo")
mpu = seqpar.initialize(2)
result = {}
for stage in (3, 1):
    model = sp_model()
    seqpar.install(model, mpu.get_sequence_parallel_group(), "sdpa")
    model.activation_checkpointing_enable({"use_reentrant": False})
    cfg = ds_config.render(DeepSpeedSchema(zero_stage=stage), global_batch=1, micro_batch=1,
                           world_size=info.world_size // 2, bf16=False, grad_clip=0.0, sequence_parallel=2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=cfg, mpu=mpu)
    res = engine(**sp_batch())
    engine.backward(res.loss * seqpar.backward_scale(stage, 2))
    grads = {name: safe_get_full_grad(p) for name, p in engine.module.named_parameters()}
    result[stage] = {"loss": res.loss.detach(), "grads": grads,
                     "attn": model.language_model.config._attn_implementation}
    seqpar.uninstall(model, "sdpa")
torch.save(result, f"{out}.rank{info.rank}")
distributed.shutdown()
'''


@pytest.mark.slow
def test_two_ranks_give_the_loss_and_gradients_of_one(tmp_path, ds_env):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    out = tmp_path / "sp"
    env = dict(ds_env, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(probe), str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    # the expectation: one process, no sequence parallelism, the same model and batch
    model = sp_model()
    ref = model(**sp_batch())
    ref.loss.backward()
    ref_grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None for g in ref_grads.values())

    ranks = [torch.load(f"{out}.rank{r}", weights_only=False) for r in (0, 1)]
    for stage in (3, 1):
        for r, rank in enumerate(ranks):
            got = rank[stage]
            assert got["attn"] == "vf_ulysses"
            assert torch.allclose(got["loss"], ref.loss.detach(), rtol=1e-5, atol=0), (stage, r, got["loss"], ref.loss)
            for name, g in ref_grads.items():
                diff = (got["grads"][name] - g).abs().max().item()
                assert diff <= 1e-5 * g.abs().max().item() + 1e-9, f"ZeRO-{stage} rank {r} {name}: {diff}"


# --------------------------------------------------------------------------------------------------
# a training run of the engine
# --------------------------------------------------------------------------------------------------
def losses(run_root: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_root / "stage2" / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}


@pytest.mark.slow
def test_zero3_training_with_sequence_parallel_matches_one_rank(tmp_path, tiny_overrides, ds_env):
    common = ["stage=2", "stage.init=parts", "model.visual_dropout_layers=[1]", "model.visual_dropout_keep_ratios=[0.5]",
              "model.visual_dropout_kinds=[text]", "model.visual_dropout_in_training=true"]
    runs = {}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    for name, launch, extra in (
        ("one", [sys.executable, "-m", "videoflash.train"], []),
        # stopped with a checkpoint after step 2 (as if preempted), then resumed to the end
        ("sp2", [*torchrun, "videoflash.train"], ["train.sequence_parallel=2", "train.stop_after_steps=2"]),
        ("sp2", [*torchrun, "videoflash.train"], ["train.sequence_parallel=2"]),
    ):
        run_root = tmp_path / name
        args = [*common, *tiny_overrides(run_root, steps=3, extra=["train.activation_checkpointing=true", *extra])]
        res = subprocess.run([*launch, *args], env=ds_env, capture_output=True, text=True, timeout=500, cwd=REPO)
        stopped = "train.stop_after_steps=2" in extra  # exit 75 of the workers; torchrun reports a failure
        assert (res.returncode != 0) == stopped, res.stdout[-3000:] + res.stderr[-3000:]
        runs[name] = run_root
    log = (runs["sp2"] / "stage2" / "train.log").read_text()
    assert "2 rank(s) (1 data-parallel x 2 sequence-parallel)" in log
    assert "stopped after step 2 with a checkpoint" in log and "at step 2 of 3" in log
    one, sp2 = losses(runs["one"]), losses(runs["sp2"])
    assert sorted(one) == sorted(sp2) == [1, 2, 3]
    for step in one:  # the same samples, the same gradients, the same AdamW steps
        assert math.isclose(sp2[step], one[step], rel_tol=1e-4), (step, sp2[step], one[step])
    export = runs["sp2"] / "stage2" / "export"
    assert json.loads((export / "training_state.json").read_text())["completed"]
    assert "vf_ulysses" not in (export / "config.json").read_text()  # the export runs without it


# --------------------------------------------------------------------------------------------------
# settings it cannot run with
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.sequence_parallel=3"], "num_attention_heads=4"),  # the tiny LLM: 4 heads, 2 KV heads
        (["train.sequence_parallel=4"], "num_key_value_heads=2"),
        (["train.sequence_parallel=0"], "train.sequence_parallel"),
        (["train.sequence_parallel=2", "model.attn_implementation=eager"], "eager"),
        (["train.sequence_parallel=2", "data.pack_tokens=4096", "stage=2", "stage.max_steps=10",
          "stage.max_tokens=4096"], "data.pack_tokens"),
    ],
)
def test_settings_it_cannot_run_with_name_the_key(overrides, message):
    from videoflash.config import ConfigError, compose, validate

    with pytest.raises(ConfigError) as err:
        validate(compose(overrides))
    assert err.value.key == "train.sequence_parallel" and message in str(err.value)


def test_heads_and_world_must_split():
    from videoflash.config import ConfigError
    from videoflash.train import sequence_parallel as seqpar

    config = tiny_model().config.text_config  # 4 attention heads, 2 KV heads
    seqpar.check_heads(config, 2)
    with pytest.raises(ConfigError, match="key-value heads.*num_key_value_heads=2"):
        seqpar.check_heads(config, 4)
    assert seqpar.data_parallel_size(8, 2) == 4
    with pytest.raises(ConfigError, match="does not divide the 6 rank"):
        seqpar.data_parallel_size(6, 4)
    # SP groups are consecutive ranks (DeepSpeed's parallel_state_sp): ranks 0,1 -> sample stream 0, ...
    assert [seqpar.data_parallel_rank(r, 2) for r in range(6)] == [0, 0, 1, 1, 2, 2]
