"""Two processes of real DeepSpeed ZeRO-3 over gloo run the four stages in one run root.

A probe launched by torchrun builds each stage with the trainer, reads DeepSpeed's own partition
of every parameter (``ds_tensor``) on each rank, trains a few steps and writes the stage's export.
Expectations come from ZeRO-3's partitioning rule (each of 2 ranks holds ceil(n/2) elements of every
parameter) and from the recipe (what each stage trains), read back from the exported weights.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

PROBE = r'''
import json, sys
from videoflash.config import compose, validate
from videoflash.train import distributed
from videoflash.train.trainer import Trainer

out, overrides = sys.argv[1], sys.argv[2:]
raw = compose(overrides)
trainer = Trainer(validate(raw), raw)
trainer.setup()
held = {name: [int(p.ds_numel), int(p.ds_tensor.numel()), bool(p.requires_grad)]
        for name, p in trainer.engine.module.named_parameters()}
optimized = sum(int(t.numel()) for t in trainer.optimizer.fp32_partitioned_groups_flat)  # fp32 master partition
rc = trainer.fit()
trainer.close()
with open(f"{out}.rank{trainer.rank}", "w") as f:
    json.dump({"world": trainer.world, "held": held, "optimized": optimized, "rc": rc,
               "attn": trainer.engine.module.language_model.config._attn_implementation}, f)
distributed.shutdown()
'''

TRAINS = {1: {"connector"}, 2: {"vision_tower", "connector", "language_model"},
          3: {"vision_tower", "connector", "language_model"}, 4: {"vision_tower", "connector"}}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}


def part(name: str) -> str:
    return name.split(".", 1)[0]


def test_four_stages_on_two_zero3_ranks(tmp_path, tiny_overrides, ds_env):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    run_root = tmp_path / "run"
    for stage in (1, 2, 3, 4):
        out = tmp_path / f"stage{stage}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(probe),
               str(out), f"stage={stage}",
               *tiny_overrides(run_root, steps=2, extra=["train.activation_checkpointing=true"])]
        res = subprocess.run(cmd, env=ds_env, capture_output=True, text=True, timeout=400)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        reports = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
        for rank, rep in enumerate(reports):
            assert rep["world"] == 2 and rep["rc"] == 0
            trainable = {n for n, (_, _, grad) in rep["held"].items() if grad}
            assert {part(n) for n in trainable} == TRAINS[stage], f"stage {stage} rank {rank}"
            for name, (numel, local, grad) in rep["held"].items():
                # ZeRO-3: every parameter is split over the 2 ranks (padded to an even split)
                assert local == math.ceil(numel / 2), f"{name}: rank {rank} holds {local} of {numel}"
            # the optimizer holds this rank's half of the trainable parameters only
            n_train = sum(rep["held"][n][0] for n in trainable)
            assert n_train / 2 <= rep["optimized"] <= n_train / 2 + len(trainable)

        export = run_root / f"stage{stage}" / "export"
        info = json.loads((export / "training_state.json").read_text())
        assert info["completed"] and info["step"] == 2
        cfg = json.loads((export / "config.json").read_text())
        assert cfg["vision_config"]["image_size"] == (128 if stage == 4 else 64)  # tiny preset: 64 px, hires 128

    # what each stage changed, read from the exports (stage 1 from the parts-built starting point)
    before = {1: weights(run_root / "stage1" / "init")}
    for stage in (2, 3, 4):
        before[stage] = weights(run_root / f"stage{stage - 1}" / "export")
    for stage in (1, 2, 3, 4):
        after = weights(run_root / f"stage{stage}" / "export")
        assert after.keys() == before[stage].keys()
        for p in ("vision_tower", "connector", "language_model"):
            names = [n for n in after if part(n) == p]
            changed = any(not torch.equal(after[n], before[stage][n].to(torch.bfloat16).float()) for n in names)
            assert changed == (p in TRAINS[stage]), f"stage {stage}: {p} changed={changed}"


def test_packed_rows_with_text_guided_dropout_on_two_zero3_ranks(tmp_path, tiny_overrides, ds_env):
    # packing on (rows of up to 1024 tokens, 2 rows per micro-batch) with text-guided dropout in
    # training: each rank's rows hold a varying number of samples, yet every rank runs the same
    # micro-batches and module calls per step (a mismatch hangs or fails gloo), and the stages end
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    run_root = tmp_path / "run"
    packing = ["data.pack_tokens=1024", "stage.max_tokens=1024", "model.visual_dropout_layers=[1]",
               "model.visual_dropout_keep_ratios=[0.5]", "model.visual_dropout_kinds=[text]",
               "model.visual_dropout_in_training=true"]  # fmt: skip
    for stage in (1, 2):
        out = tmp_path / f"stage{stage}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(probe),
               str(out), f"stage={stage}", *tiny_overrides(run_root, steps=2, extra=packing)]
        res = subprocess.run(cmd, env=ds_env, capture_output=True, text=True, timeout=400)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        for r in (0, 1):
            rep = json.loads(Path(f"{out}.rank{r}").read_text())
            assert rep["rc"] == 0 and rep["attn"] == "packed_varlen"  # sdpa + packing: the varlen path
        info = json.loads((run_root / f"stage{stage}" / "export" / "training_state.json").read_text())
        assert info["completed"] and info["step"] == 2
        # 2 steps x 4 rows over both ranks: packed rows carried more samples than rows
        assert info["samples_seen"] > 2 * 4, info
