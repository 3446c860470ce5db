"""Checkpoints that survive damage and hold data only (videoflash.train.checkpoint).

The pure-Python parts run on checkpoint directories laid out here by hand as the trainer writes them
(DeepSpeed's files are torch files of tensors under ``deepspeed/``); the expectation of each case is
the file this test damaged. The full-disk case runs real DeepSpeed ZeRO-3 in one process on a tmpfs
that really fills up (or, where mounting is not allowed, under a file-size limit).
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.crafted_pickle import save_with_payload
from videoflash.model.safe_load import load_torch_file
from videoflash.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    build_manifest,
    check_plain,
    rng_state,
    set_rng_state,
    verify,
)

REPO = Path(__file__).resolve().parents[1]
WORLD = 2


def write_checkpoint(ckpt_dir: Path, step: int, world: int = WORLD, manifest: bool = True) -> Path:
    """A checkpoint in the trainer's layout; ``latest`` points at it."""
    d = ckpt_dir / f"step_{step:08d}"
    (d / "deepspeed").mkdir(parents=True)
    for r in range(world):
        torch.save({"module": {"w": torch.full((64,), float(step))}}, d / "deepspeed" / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        torch.save({"loader": {"epoch": 0, "batches_in_epoch": step}, "rng": rng_state()}, d / f"rank{r:05d}.pt")
    (d / "trainer_state.json").write_text(json.dumps({"stage": 2, "step": step, "world_size": world}))
    if manifest:
        (d / "manifest.json").write_text(json.dumps(build_manifest(d)))
    (ckpt_dir / "latest").write_text(d.name + "\n")
    return d


@pytest.fixture
def two(tmp_path):
    """Checkpoints of steps 4 and 8; ``latest`` names step 8."""
    ckpt = tmp_path / "checkpoints"
    return ckpt, write_checkpoint(ckpt, 4), write_checkpoint(ckpt, 8)


def manager(ckpt: Path, **kw) -> CheckpointManager:
    return CheckpointManager(ckpt, keep=2, rank=0, world_size=kw.pop("world", WORLD), **kw)


def warnings_of(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# -- finding the checkpoint to resume from --------------------------------------------------------
def test_latest_names_the_intact_newest(two):
    ckpt, _, newest = two
    assert verify(newest) == []
    assert manager(ckpt).latest() == newest


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, named", [
    (lambda d: _truncate(d / "rank00001.pt"), "rank00001.pt has"),
    (lambda d: _truncate(d / "deepspeed" / "zero_pp_rank_0_mp_rank_00_model_states.pt"), "zero_pp_rank_0_mp_rank_00_model_states.pt has"),
    (lambda d: (d / "deepspeed" / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink(), "zero_pp_rank_1_mp_rank_00_model_states.pt is missing"),
    (lambda d: _flip_last_byte(d / "trainer_state.json"), "trainer_state.json does not match its SHA-256"),
    (lambda d: (d / "manifest.json").write_text('{"files": {"rank0'), "manifest.json is unreadable"),
], ids=["truncated-rank-file", "truncated-deepspeed-file", "missing-deepspeed-file", "changed-trainer-state", "garbled-manifest"])
def test_a_damaged_latest_falls_back_to_the_previous_intact_one(two, caplog, damage, named):
    ckpt, previous, newest = two
    damage(newest)
    assert any(named in p for p in verify(newest)), verify(newest)
    with caplog.at_level(logging.WARNING):
        assert manager(ckpt).latest() == previous
    said = warnings_of(caplog)
    assert str(newest) in said and str(previous) in said and named in said


@pytest.mark.parametrize("pointer", [b"step_00000012\n", b"step_000", b"\xff\xfe\x00garbage", b""],
                         ids=["missing-dir", "truncated", "garbled", "empty"])
def test_a_bad_pointer_falls_back_to_the_newest_intact_one(two, caplog, pointer):
    ckpt, _, newest = two
    (ckpt / "latest").write_bytes(pointer)
    with caplog.at_level(logging.WARNING):
        assert manager(ckpt).latest() == newest
    said = warnings_of(caplog)
    assert str(ckpt / "latest") in said and str(newest) in said


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(two):
    ckpt, previous, newest = two
    _truncate(previous / "rank00000.pt")
    (newest / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint") as err:
        manager(ckpt).latest()
    assert str(previous) in str(err.value) and str(newest) in str(err.value)


def test_no_checkpoint_at_all_starts_fresh(tmp_path):
    assert manager(tmp_path / "checkpoints").latest() is None


def test_a_checkpoint_without_manifest_is_checked_for_its_files(tmp_path):
    """Checkpoints written before manifests existed are still found; a missing rank file shows."""
    d = write_checkpoint(tmp_path, 3, manifest=False)
    assert verify(d) == []
    (d / "rank00001.pt").unlink()
    assert verify(d) == [f"{d / 'rank00001.pt'} is missing"]


# -- loading as data --------------------------------------------------------------------------------
def test_a_crafted_rank_file_is_refused_before_anything_runs(two, tmp_path):
    ckpt, _, newest = two
    marker = tmp_path / "marker"
    save_with_payload({"loader": None, "rng": rng_state()}, newest / "rank00000.pt", marker)
    (newest / "manifest.json").write_text(json.dumps(build_manifest(newest)))  # the manifest agrees with it
    with pytest.raises(CheckpointError, match=r"rank00000\.pt: refusing to unpickle (io|builtins)\.open.*trust_checkpoint_pickle"):
        manager(ckpt).load(None, newest)  # refused before DeepSpeed (here: no engine at all) is touched
    assert not marker.exists()
    state = manager(ckpt, trust_pickle=True).read_rank_state(newest / "rank00000.pt")  # the explicit opt-in
    assert marker.exists() and set(state) == {"loader", "rng", "payload"}


@pytest.mark.parametrize("written_by", [1, 2], ids=["same-world-size", "conversion-for-another-world-size"])
def test_a_crafted_deepspeed_file_is_refused_before_deepspeed_reads_it(tmp_path, written_by):
    """DeepSpeed (and its universal converter) unpickle without restriction: checked first."""
    ckpt = tmp_path / "checkpoints"
    d = write_checkpoint(ckpt, 8, world=written_by)
    marker = tmp_path / "marker"
    bad = d / "deepspeed" / f"zero_pp_rank_{written_by - 1}_mp_rank_00_model_states.pt"
    save_with_payload({"module": {}}, bad, marker)
    (d / "manifest.json").write_text(json.dumps(build_manifest(d)))
    mgr = manager(ckpt, world=1)  # one rank scans every file
    with pytest.raises(CheckpointError, match=rf"{bad.name}: refusing to unpickle (io|builtins)\.open"):
        mgr.load(None, d) if written_by == 1 else mgr.prepare_universal(d)
    assert not marker.exists() and not (d / "deepspeed_universal").exists()


def test_rng_state_is_plain_data_and_restores_every_generator(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(()).item(), np.random.randn())  # after the capture
    torch.save({"rng": saved}, tmp_path / "r.pt")
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_torch_file(tmp_path / "r.pt")["rng"])  # weights_only, no allow-list
    assert (random.random(), np.random.rand(), torch.rand(()).item(), np.random.randn()) == expected


def test_a_rank_state_that_would_not_load_as_data_is_refused_at_save():
    with pytest.raises(TypeError, match=r"rank_state\['loader'\]\['epoch'\] is a numpy.int64"):
        check_plain({"loader": {"epoch": np.int64(3)}, "rng": rng_state()})


# -- a full disk ------------------------------------------------------------------------------------
PROBE = r'''
import json, resource, signal, sys
from pathlib import Path
import torch
from videoflash.train import distributed
from videoflash.train.checkpoint import CheckpointManager, CheckpointWriteError, rng_state

ckpt_dir, how, arg = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
distributed.init(distributed.detect(), "gloo")
import deepspeed
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
config = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
mgr = CheckpointManager(ckpt_dir, keep=2, rank=0, world_size=1)
first = mgr.save(engine, 1, {"step": 1}, {"loader": None, "rng": rng_state()})
if how == "fill":  # take every byte the file system has left
    with open(arg, "wb", buffering=0) as f:
        for size in (1 << 16, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
else:  # a file-size limit: writes past it fail (EFBIG)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(arg), resource.RLIM_INFINITY))
out = {"first": str(first)}
try:
    mgr.save(engine, 2, {"step": 2}, {"loader": None, "rng": rng_state()})
except CheckpointWriteError as err:
    out["error"] = str(err)
print("RESULT " + json.dumps(out), flush=True)
'''


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root may mount one), else None."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.slow
def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(small_disk, tmp_path, ds_env):
    root = small_disk or tmp_path
    ckpt = root / "checkpoints"
    how, arg = ("fill", str(root / "filler")) if small_disk else ("fsize", "20000")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    res = subprocess.run([sys.executable, str(probe), str(ckpt), how, arg], cwd=REPO, capture_output=True, text=True,
                         env={**ds_env, "PYTHONPATH": str(REPO)}, timeout=300)
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, res.stdout[-2000:] + res.stderr[-3000:]
    out = json.loads(line[len("RESULT "):])
    error = out.get("error", "")
    assert str(ckpt / ".tmp_step_00000002") in error  # the path that could not be written
    if small_disk:
        assert "no space left" in error
    assert f"the previous checkpoint ({ckpt / 'step_00000001'}) and `latest` are intact" in error
    assert (ckpt / "latest").read_text().strip() == "step_00000001"
    assert verify(ckpt / "step_00000001") == []
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000001"]  # the partial one is gone
