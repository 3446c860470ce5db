"""A run killed mid-way, or preempted by a signal, resumes to the same losses at the same steps as a
run never interrupted (2 ranks of ZeRO-3 over gloo, the real command line)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

STEPS = 60  # long enough that a starved test process still catches the run mid-way
EXIT_PREEMPTED = 75  # documented in docs/training.md


def rows(metrics: Path) -> list[dict]:
    """The records of metrics.jsonl (a line torn by SIGKILL is left out)."""
    out = []
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def losses(metrics: Path, records=None) -> dict[int, float]:
    """step -> loss, with every logged step (a step logged twice would be a repeated step)."""
    out: dict[int, float] = {}
    for row in rows(metrics) if records is None else records:
        if "loss" in row:
            assert row["step"] not in out, f"step {row['step']} logged twice"
            out[row["step"]] = row["loss"]
    return out


def events(metrics: Path, kind: str) -> list[dict]:
    return [r for r in rows(metrics) if r.get("event") == kind]


def args(tiny_overrides, run_root, *extra):
    # stage 2 straight from parts: every part trains, three learning rates
    return ["stage=2", "stage.init=parts", *tiny_overrides(run_root, steps=STEPS, extra=("train.checkpoint_every=4", *extra))]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun's workers run in their own process groups)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        kids = [c for c, parent in parents.items() if parent == current]
        out += kids
        todo += kids
    return out


def spawn(cmd, env, **kw):
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def torchrun(cli_args, env, **kw):
    return spawn([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                  "videoflash.train", *cli_args], env, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_overrides, ds_env) -> dict[int, float]:
    """The uninterrupted run, started bare with ``launcher.nproc_per_node=2``: it re-executes itself
    as two gloo ranks, so the torchrun and srun runs below, which resume against it, also check
    that this relaunch is the same two-rank run."""
    root = tmp_path_factory.mktemp("uninterrupted")
    proc = spawn([sys.executable, "-m", "videoflash.train", *args(tiny_overrides, root, "launcher.nproc_per_node=2")], ds_env)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-4000:]
    assert "CPU, launcher.nproc_per_node=2: starting 2 processes" in out, out[-4000:]
    ref = losses(root / "stage2" / "metrics.jsonl")
    assert sorted(ref) == list(range(1, STEPS + 1))
    return ref


def test_killed_run_resumes_to_the_same_losses(tmp_path, tiny_overrides, ds_env, reference):
    run_root = tmp_path / "run"
    metrics = run_root / "stage2" / "metrics.jsonl"
    proc = torchrun(args(tiny_overrides, run_root), ds_env)
    deadline = time.time() + 300
    while not events(metrics, "checkpoint") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    for pid in [*descendants(proc.pid), proc.pid]:  # both ranks and torchrun, without warning
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate(timeout=60)
    killed_at = max(losses(metrics))
    assert killed_at < STEPS, "the run finished before it could be killed"

    proc = torchrun(args(tiny_overrides, run_root, "resume=auto"), ds_env)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-4000:]
    records = rows(metrics)
    last_start = max(i for i, r in enumerate(records) if r.get("event") == "start")
    start = records[last_start]
    assert start["resumed_from"].endswith(f"step_{start['step']:08d}")
    assert 4 <= start["step"] <= killed_at and start["step"] % 4 == 0  # the newest complete checkpoint
    after = losses(metrics, records[last_start:])
    assert sorted(after) == list(range(start["step"] + 1, STEPS + 1))  # nothing lost, nothing skipped
    for step, loss in after.items():
        assert loss == pytest.approx(reference[step], rel=1e-6, abs=1e-7), f"step {step}"
    assert (run_root / "stage2" / "export" / "model.safetensors").is_file()


def test_preempted_ranks_stop_at_the_same_step_and_resume_exactly(tmp_path, tiny_overrides, ds_env, reference):
    """Two ranks started as srun starts them (SLURM variables, no torchrun); SIGUSR1 reaches rank 1
    only; both stop after the same step with a checkpoint of it and exit 75; resume continues."""
    run_root = tmp_path / "run"
    metrics = run_root / "stage2" / "metrics.jsonl"
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = dict(ds_env, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_NUM_TASKS="2",
                   SLURM_NTASKS="2", SLURM_JOB_ID="4242", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(key, None)
        procs.append(subprocess.Popen([sys.executable, "-m", "videoflash.train", *args(tiny_overrides, run_root)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.time() + 300
    while (not metrics.exists() or not losses(metrics) or max(losses(metrics)) < 3) and time.time() < deadline:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGUSR1)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [EXIT_PREEMPTED, EXIT_PREEMPTED], outs[0][-3000:] + outs[1][-3000:]
    stopped = max(losses(metrics))
    assert stopped < STEPS
    assert events(metrics, "preempted")[-1]["step"] == stopped
    assert events(metrics, "checkpoint")[-1]["step"] == stopped  # a checkpoint of exactly that step
    latest = (run_root / "stage2" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped:08d}"

    proc = torchrun(args(tiny_overrides, run_root, "resume=auto"), ds_env)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-4000:]
    got = losses(metrics)  # raises if a step was logged twice
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), f"step {step}"


def test_a_damaged_latest_resumes_from_the_previous_checkpoint_and_a_crafted_one_is_refused(
        tmp_path, tiny_overrides, ds_env, reference):
    """Checkpoints at steps 4 and 8. A rank file of step 8 replaced by a pickle that would create a
    file (and a manifest that agrees with it): resume=<step 8> stops with exit 2 naming the file, and
    the file is never created. The same rank file truncated: resume=auto warns, names both
    checkpoints, resumes from step 4 and reaches the losses of the uninterrupted run."""
    from tests.crafted_pickle import save_with_payload
    from videoflash.train.checkpoint import build_manifest

    run_root = tmp_path / "run"
    ckpts = run_root / "stage2" / "checkpoints"
    proc = torchrun(args(tiny_overrides, run_root, "train.stop_after_steps=8"), ds_env)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode != 0 and (ckpts / "latest").read_text().strip() == "step_00000008", out[-3000:]
    step8, step4 = ckpts / "step_00000008", ckpts / "step_00000004"
    rank1 = step8 / "rank00001.pt"
    original = rank1.read_bytes()

    marker = tmp_path / "marker"
    save_with_payload({"loader": None, "rng": None}, rank1, marker)
    (step8 / "manifest.json").write_text(json.dumps(build_manifest(step8)))
    proc = torchrun(args(tiny_overrides, run_root, f"resume={step8}"), ds_env)
    out, _ = proc.communicate(timeout=400)
    assert "rank00001.pt: refusing to unpickle" in out and not marker.exists(), out[-3000:]
    assert "train.trust_checkpoint_pickle" in out

    rank1.write_bytes(original[: len(original) // 2])
    proc = torchrun(args(tiny_overrides, run_root, "resume=auto"), ds_env)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-4000:]
    assert f"checkpoint {step8} is not intact" in out and f"resuming from {step4}" in out
    metrics = run_root / "stage2" / "metrics.jsonl"
    records = rows(metrics)
    last_start = max(i for i, r in enumerate(records) if r.get("event") == "start")
    assert records[last_start]["step"] == 4 and records[last_start]["resumed_from"] == str(step4)
    after = losses(metrics, records[last_start:])
    assert sorted(after) == list(range(5, STEPS + 1))
    for step, loss in after.items():
        assert loss == pytest.approx(reference[step], rel=1e-6, abs=1e-7), f"step {step}"


def test_resume_with_another_worker_count_keeps_the_data_position(tmp_path, tiny_overrides, ds_env):
    """A run stopped after step 4 and resumed with 1 DataLoader worker instead of none: the loader
    gets every rank's state and deals out the rest of the data epoch (not a fresh epoch)."""
    run_root = tmp_path / "run"
    metrics = run_root / "stage2" / "metrics.jsonl"

    def cli(*extra):
        return ["stage=2", "stage.init=parts",
                *tiny_overrides(run_root, steps=12, extra=("train.checkpoint_every=4", *extra))]  # fmt: skip

    proc = torchrun(cli("train.stop_after_steps=4"), ds_env)
    out, _ = proc.communicate(timeout=400)  # the ranks exit 75, which torchrun reports as a failure
    assert "stopped after step 4 with a checkpoint" in out, out[-4000:]
    assert (run_root / "stage2" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    proc = torchrun(cli("resume=auto", "data.num_workers=1"), ds_env)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-4000:]
    assert "loader: 2 ranks x 0 workers -> 2 x 1 in epoch 0" in out, out[-4000:]
    assert sorted(losses(metrics)) == list(range(1, 13))  # every step once
