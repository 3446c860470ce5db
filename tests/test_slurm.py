"""Multi-node training through SLURM, on a real two-node cluster on loopback (tests/slurm_cluster.py).

Needs root (the cluster's daemons; slurm-wlm and munge are apt-installed when missing): without root
every test here except the submit helper's own checks skips, saying so. CI runs as root.

Every job is submitted the way users submit: ``python -m videoflash.launch.slurm cluster=loopback
...`` writes the real ``scripts/slurm/train.sbatch`` into the run directory and ``sbatch``es it; the
job trains the tiny model (stage 2: every part trains, three optimizer groups) with DeepSpeed ZeRO-3
over gloo on 2 nodes x 2 ranks. The expectations are independent of the run under test: the
per-step losses of an uninterrupted run, the job's own SLURM state, and DeepSpeed's offline
consolidation (``zero_to_fp32``) of a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import REPO, requires_root, slurm_cluster  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.slow]

STEPS = 16  # optimizer steps of every run
KILL_BOUND_S = 90  # a killed rank ends the whole job within this (the loopback straggler timeout is 60 s)
JOB_TIMEOUT_S = 600


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def train_args(data_root: Path, steps: int = STEPS, *extra: str) -> list[str]:
    return [
        "experiment=quickstart",
        "deepspeed=zero3",  # the quickstart itself runs one process on ZeRO-1; these jobs shard
        "stage=2",
        "stage.init=parts",  # stage 2 from fresh parts: vision tower, connector and LLM all train
        f"data.root={data_root}",
        f"stage.max_steps={steps}",
        "stage.global_batch_size=4",
        "stage.micro_batch_size=1",
        "data.num_workers=0",
        "train.progress_bar=false",
        "train.checkpoint_every=4",
        "train.keep_checkpoints=2",
        *extra,
    ]


def submit(cluster, run_root: Path, args: list[str], *launcher: str) -> str:
    """``python -m videoflash.launch.slurm cluster=loopback ...``; returns the job id."""
    cmd = [sys.executable, "-m", "videoflash.launch.slurm", "cluster=loopback", *launcher, f"run_root={run_root}", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=cluster.env, cwd=REPO)
    assert r.returncode == 0, f"submit failed:\n{r.stdout}\n{r.stderr}"
    m = re.search(r"submitted job (\d+)", r.stdout)
    assert m, r.stdout
    return m.group(1)


def job_log(cluster, job_id: str) -> str:
    return Path(cluster.job(job_id)["StdOut"]).read_text(errors="replace")


def metric_rows(run_root: Path, stage: int = 2) -> list[dict]:
    path = run_root / f"stage{stage}" / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_losses(rows: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]


def logged_step(cluster, job_id: str, step: int) -> bool:
    try:
        return f"step {step}/" in job_log(cluster, job_id)
    except (OSError, KeyError):
        return False


def checkpoints_dir(run_root: Path, stage: int = 2) -> Path:
    return run_root / f"stage{stage}" / "checkpoints"


def worker_pid(job_id: str, rank: int, attempt: int = 0) -> int | None:
    """The pid of the training worker with RANK=rank of the job (all "nodes" are this machine)."""
    tag = f"VF_RDZV_ID=vf-{job_id}-{attempt}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if tag in env and f"RANK={rank}".encode() in env and any(e.startswith(b"LOCAL_RANK=") for e in env):
            return int(entry)
    return None


def assert_losses_match(got: list[tuple[int, float]], expected: dict[int, float]) -> None:
    for step, loss in got:
        assert math.isclose(loss, expected[step], rel_tol=1e-5, abs_tol=1e-6), (
            f"step {step}: loss {loss} but the uninterrupted run had {expected[step]}"
        )


def complete_checkpoint(path: Path, ranks: int) -> bool:
    ds = path / "deepspeed"
    return (
        (path / "trainer_state.json").is_file()
        and all((path / f"rank{r:05d}.pt").is_file() for r in range(ranks))
        and len(list(ds.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))) == ranks
    )


# --------------------------------------------------------------------------------------------------
# fixtures: a corpus, an uninterrupted run, a run with a rank killed in a checkpoint save
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small synthetic corpus (64 short clips in 4 shards), as `make quickstart` builds one."""
    root = tmp_path_factory.mktemp("corpus")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "data_tools.synth_videos", "--out", str(root), "--num-train", "64",
                    "--num-heldout", "8", "--long-fraction", "0", "--workers", "1"],
                   check=True, capture_output=True, timeout=300, cwd=REPO, env=env)
    subprocess.run([sys.executable, "-m", "data_tools.make_shards", "--annotations", str(root / "train.jsonl"),
                    "--media-root", str(root), "--out", str(root / "shards"), "--prefix", "train",
                    "--max-samples-per-shard", "16"],
                   check=True, capture_output=True, timeout=300, cwd=REPO, env=env)
    return root


@pytest.fixture(scope="module")
def baseline(slurm_cluster, corpus, tmp_path_factory) -> dict:
    """An uninterrupted 2-node x 2-rank run of STEPS steps: the expectation of the other tests."""
    run_root = tmp_path_factory.mktemp("baseline") / "run"
    job = submit(slurm_cluster, run_root, train_args(corpus))
    info = slurm_cluster.wait_done(job, JOB_TIMEOUT_S)
    log = job_log(slurm_cluster, job)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-5000:]}"
    losses = step_losses(metric_rows(run_root))
    return {"job": job, "info": info, "log": log, "run_root": run_root, "losses": dict(losses), "steps": losses}


@pytest.fixture(scope="module")
def crashed_run(slurm_cluster, corpus, tmp_path_factory) -> dict:
    """A run whose rank 3 is SIGKILLed while a checkpoint is being written (checkpoint every step).

    Returns the job's facts, and a copy of its run directory taken right after it ended (the
    resume tests work on copies)."""
    base = tmp_path_factory.mktemp("crashed")
    run_root = base / "run"
    job = submit(slurm_cluster, run_root, train_args(corpus, STEPS, "train.checkpoint_every=1"))
    ckpts = checkpoints_dir(run_root)
    slurm_cluster.wait_until(lambda: logged_step(slurm_cluster, job, 4), JOB_TIMEOUT_S, "step 4", job_id=job)
    pid = worker_pid(job, rank=3)
    assert pid is not None, "no worker with RANK=3 found"
    # Kill rank 3 as soon as a checkpoint from step 5 on is being written (its .tmp_ directory exists).
    killed_during, deadline = None, time.monotonic() + 120
    while time.monotonic() < deadline and killed_during is None:
        try:
            for name in os.listdir(ckpts):
                m = re.match(r"^\.tmp_step_(\d+)$", name)
                if m and int(m.group(1)) >= 5:
                    os.kill(pid, signal.SIGKILL)
                    killed_during = int(m.group(1))
                    break
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    assert killed_during is not None, "no checkpoint save from step 5 on was seen"
    killed_at = time.monotonic()
    info = slurm_cluster.wait_done(job, KILL_BOUND_S + 60)
    ended_after = time.monotonic() - killed_at
    copy = base / "copy"
    shutil.copytree(run_root, copy, symlinks=True)
    return {"job": job, "info": info, "log": job_log(slurm_cluster, job), "run_root": run_root, "copy": copy,
            "corpus": corpus,
            "killed_during": killed_during, "ended_after_s": ended_after}


def fresh_copy(crashed: dict, dest: Path) -> Path:
    shutil.copytree(crashed["copy"], dest, symlinks=True)
    return dest


def latest_checkpoint(run_root: Path) -> Path:
    ck = checkpoints_dir(run_root)
    return ck / (ck / "latest").read_text().strip()


# --------------------------------------------------------------------------------------------------
# the submit helper (no cluster needed)
# --------------------------------------------------------------------------------------------------
def run_helper(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "videoflash.launch.slurm", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_helper_writes_job_script_config_and_revision(tmp_path):
    run_root = tmp_path / "run"
    r = run_helper("cluster=loopback", "nodes=2", "procs_per_node=2", "partition=loop", "time=01:00:00",
                   "signal_lead_s=120", "env.NCCL_DEBUG=INFO", f"run_root={run_root}",
                   *train_args(tmp_path / "data", 8), "--dry-run")
    assert r.returncode == 0, r.stderr
    (submit_dir,) = (run_root / "submit").iterdir()
    job = (submit_dir / "job.sbatch").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --time=01:00:00", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --open-mode=append", "#SBATCH --partition=loop",
                 f"#SBATCH --output={run_root}/logs/%x-%j.out", "export VF_PROCS_PER_NODE=2"):
        assert line in job.splitlines(), line
    assert subprocess.run(["bash", "-n", str(submit_dir / "job.sbatch")]).returncode == 0
    assert "export NCCL_DEBUG=INFO" in (submit_dir / "env.sh").read_text()
    config = (submit_dir / "config.yaml").read_text()
    assert "kind: slurm" in config and f"run_root: {run_root}" in config and "max_steps: 8" in config
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if head:
        assert (submit_dir / "git.txt").read_text().startswith(head)
    assert (submit_dir / "code" / "videoflash" / "train" / "trainer.py").is_file()
    assert (submit_dir / "code" / "configs" / "train.yaml").is_file()
    assert "global batch 4 = micro-batch 1 x 4 ranks x 1 accumulation step(s)" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["nodes=3"], "not a multiple"),  # 4 samples do not split over 3 x 2 ranks
        (["nodez=3"], "nodez"),  # an unknown key is a training key, and the training config says so
        (["cluster.nodez=3"], "nodez"),
        (["nodes=two"], "nodes"),
        (["time=24:00:00", "signal_lead_s=90000"], "signal_lead_s"),
        (["resume=never"], "resume=auto"),
        (["cluster=nosuch"], "nosuch"),
        (["stage.lrr=1"], "lrr"),
    ],
)
def test_helper_rejects_bad_settings_before_submitting(tmp_path, args, message):
    r = run_helper("cluster=loopback", f"run_root={tmp_path / 'run'}", *train_args(tmp_path / "data", 8), *args,
                   "--dry-run")
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert not (tmp_path / "run" / "submit").exists()


# --------------------------------------------------------------------------------------------------
# the cluster and a plain run
# --------------------------------------------------------------------------------------------------
@requires_root
def test_loopback_cluster_has_two_nodes(slurm_cluster):
    nodes = slurm_cluster.cmd("sinfo", "-N", "-h", "-o", "%N %t").split()
    assert nodes == ["node1", "idle", "node2", "idle"]
    out = slurm_cluster.cmd("srun", "-N2", "-n2", "bash", "-c", "echo $SLURMD_NODENAME $SLURM_PROCID", timeout=60)
    assert sorted(out.splitlines()) == ["node1 0", "node2 1"]


@requires_root
@pytest.mark.timeout(1200)
def test_sbatch_trains_on_two_nodes_with_zero3(slurm_cluster, baseline):
    info, log, run_root = baseline["info"], baseline["log"], baseline["run_root"]
    assert info["ExitCode"] == "0:0" and info["NodeList"] == "node[1-2]" and info["Restarts"] == "0"
    # One torchrun per node, each with 2 workers, and both ended well.
    assert "node node1 (index 0 of 2): torchrun, 2 workers" in log
    assert "node node2 (index 1 of 2): torchrun, 2 workers" in log
    assert "node node1: torchrun exited 0" in log and "node node2: torchrun exited 0" in log
    for node in ("node1", "node2"):
        workers = sorted(p.parent.name for p in (run_root / "logs" / baseline["job"] / "attempt0" / node).glob("*/attempt_0/*/stdout.log"))
        assert workers == ["0", "1"], f"{node}: worker logs {workers}"
    assert "on 4 rank(s)" in log
    # ZeRO-3 over 4 ranks: the last checkpoint holds 4 partitions of the optimizer state.
    last = latest_checkpoint(run_root)
    assert last.name == f"step_{STEPS:08d}" and complete_checkpoint(last, ranks=4)
    assert json.loads((last / "trainer_state.json").read_text())["world_size"] == 4
    assert [s for s, _ in baseline["steps"]] == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in baseline["losses"].values())
    state = json.loads((run_root / "stage2" / "export" / "training_state.json").read_text())
    assert state["completed"] and state["step"] == STEPS
    # What was submitted is in the run directory.
    (submit_dir,) = (run_root / "submit").iterdir()
    assert (submit_dir / "job.sbatch").is_file() and (submit_dir / "git.txt").is_file()
    assert "id: 2" in (submit_dir / "config.yaml").read_text()
    assert f"code snapshot: {submit_dir / 'code'}" in log


SP_STEPS = 3


@requires_root
@pytest.mark.timeout(1800)
def test_sequence_parallel_over_two_nodes_matches_data_parallel(slurm_cluster, corpus, tmp_path):
    """2 nodes x 2 ranks with train.sequence_parallel=2: each node is one sequence-parallel group
    (ranks 0-1, 2-3) and the two nodes are the data-parallel ranks. Expected: the per-step losses of
    the same run on 2 data-parallel ranks without sequence parallelism (torchrun on this machine),
    which read the same samples per data-parallel rank."""
    args = train_args(corpus, SP_STEPS, "train.checkpoint_every=0")
    run_root = tmp_path / "sp"
    cmd = [sys.executable, "-m", "videoflash.launch.slurm", "cluster=loopback", f"run_root={run_root}", *args,
           "train.sequence_parallel=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=slurm_cluster.env, cwd=REPO)
    assert r.returncode == 0, f"submit failed:\n{r.stdout}\n{r.stderr}"
    assert "global batch 4 = micro-batch 1 x 2 data-parallel ranks (sequence parallel 2) x 2 accumulation step(s)" in r.stdout
    job = re.search(r"submitted job (\d+)", r.stdout).group(1)
    local = tmp_path / "dp"
    ref = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "videoflash.train", *args, f"run_root={local}"],
                         capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=REPO,
                         env=dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1"))
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    info = slurm_cluster.wait_done(job, JOB_TIMEOUT_S)
    log = job_log(slurm_cluster, job)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "node[1-2]", f"{info}\n{log[-5000:]}"
    assert "node node1: torchrun exited 0" in log and "node node2: torchrun exited 0" in log
    assert "on 4 rank(s) (2 data-parallel x 2 sequence-parallel)" in log
    got, expected = step_losses(metric_rows(run_root)), dict(step_losses(metric_rows(local)))
    assert [s for s, _ in got] == list(range(1, SP_STEPS + 1)) and sorted(expected) == [s for s, _ in got]
    for step, loss in got:
        assert math.isclose(loss, expected[step], rel_tol=1e-4), (step, loss, expected[step])
    assert json.loads((run_root / "stage2" / "export" / "training_state.json").read_text())["completed"]


# --------------------------------------------------------------------------------------------------
# preemption
# --------------------------------------------------------------------------------------------------
@requires_root
@pytest.mark.timeout(1800)
def test_preemption_checkpoints_requeues_and_resumes_without_losing_a_step(slurm_cluster, corpus, baseline, tmp_path):
    run_root = tmp_path / "run"
    job = submit(slurm_cluster, run_root, train_args(corpus))
    slurm_cluster.wait_until(lambda: logged_step(slurm_cluster, job, 3), JOB_TIMEOUT_S, "step 3", job_id=job)
    slurm_cluster.signal_batch(job, "USR1")  # the time-limit warning (--signal=B:USR1@...)
    info = slurm_cluster.wait_done(job, 2 * JOB_TIMEOUT_S)
    log = job_log(slurm_cluster, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-5000:]}"
    assert info["Restarts"] == "1", "the job should have requeued itself once"
    assert "requeueing job" in log
    m = re.search(r"resumed from \S+step_(\d+) at step (\d+)", log)
    assert m, log[-5000:]
    stopped = int(m.group(2))
    assert 3 <= stopped < STEPS
    # Every step exactly once, each with the loss of the uninterrupted run.
    steps = step_losses(metric_rows(run_root))
    assert [s for s, _ in steps] == list(range(1, STEPS + 1))
    assert_losses_match(steps, baseline["losses"])
    state = json.loads((run_root / "stage2" / "export" / "training_state.json").read_text())
    assert state["completed"] and state["step"] == STEPS


# --------------------------------------------------------------------------------------------------
# faults
# --------------------------------------------------------------------------------------------------
@requires_root
@pytest.mark.timeout(1200)
def test_killed_rank_ends_the_job_within_the_bound_naming_rank_and_cause(crashed_run):
    info, log = crashed_run["info"], crashed_run["log"]
    assert info["JobState"] == "FAILED", info
    assert info["Restarts"] == "0", "a crash must not requeue"
    assert crashed_run["ended_after_s"] < KILL_BOUND_S, f"the job took {crashed_run['ended_after_s']:.0f} s to end"
    assert re.search(r"failed rank 3 \(local_rank: 1\): exit code -9 .*SIGKILL", log), log[-5000:]
    assert "training FAILED" in log


@requires_root
@pytest.mark.timeout(1800)
def test_crash_during_a_save_leaves_the_previous_checkpoint_latest(slurm_cluster, crashed_run, baseline, tmp_path):
    run_root = fresh_copy(crashed_run, tmp_path / "run")
    ck = checkpoints_dir(run_root)
    latest = latest_checkpoint(run_root)
    assert complete_checkpoint(latest, ranks=4), f"latest names {latest}, which is incomplete"
    step = json.loads((latest / "trainer_state.json").read_text())["step"]
    tmp = ck / f".tmp_step_{crashed_run['killed_during']:08d}"
    if tmp.exists():  # the kill landed inside the save: that checkpoint never became `latest`
        assert step < crashed_run["killed_during"]
    assert not (ck / f"step_{crashed_run['killed_during']:08d}").exists() or step == crashed_run["killed_during"]
    # Resubmitted, the run continues from `latest` with the losses of the uninterrupted run.
    before = len(metric_rows(run_root))
    job = submit(slurm_cluster, run_root, train_args(crashed_run["corpus"], STEPS, "train.checkpoint_every=1"))
    info = slurm_cluster.wait_done(job, JOB_TIMEOUT_S)
    log = job_log(slurm_cluster, job)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-5000:]}"
    assert f"resumed from {latest} at step {step}" in log
    resumed = step_losses(metric_rows(run_root)[before:])
    assert [s for s, _ in resumed] == list(range(step + 1, STEPS + 1))
    assert_losses_match(resumed, baseline["losses"])


@requires_root
@pytest.mark.timeout(1800)
def test_resume_on_fewer_ranks(slurm_cluster, crashed_run, baseline, tmp_path):
    """A checkpoint written by 4 ranks (2 nodes x 2) resumes on 2 ranks (2 nodes x 1)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    corpus_root = crashed_run["corpus"]
    fewer = ("nodes=2", "procs_per_node=1")
    # 1. Load on 2 ranks and export at once (max_steps = the checkpoint's step): the weights must be
    #    exactly DeepSpeed's offline consolidation of the 4-rank checkpoint.
    run_a = fresh_copy(crashed_run, tmp_path / "a")
    latest = latest_checkpoint(run_a)
    step = json.loads((latest / "trainer_state.json").read_text())["step"]
    job = submit(slurm_cluster, run_a, train_args(corpus_root, step, "train.export_dtype=fp32"), *fewer)
    info = slurm_cluster.wait_done(job, JOB_TIMEOUT_S)
    log = job_log(slurm_cluster, job)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-5000:]}"
    assert "on 2 rank(s)" in log
    expected = get_fp32_state_dict_from_zero_checkpoint(str(crashed_run["copy"] / latest.relative_to(run_a)), tag="deepspeed")
    exported = {}
    for f in sorted((run_a / "stage2" / "export").glob("*.safetensors")):
        exported.update(load_file(f))
    common = set(expected) & set(exported)
    assert len(common) >= len(expected) - 1, sorted(set(expected) - set(exported))  # a tied lm_head may be left out
    for name in sorted(common):
        assert (exported[name].float() == expected[name].float()).all(), name
    # 2. Train on to the end on 2 ranks: every remaining step once, from the checkpoint's step.
    run_b = fresh_copy(crashed_run, tmp_path / "b")
    before = len(metric_rows(run_b))
    job = submit(slurm_cluster, run_b, train_args(corpus_root, STEPS), *fewer)
    info = slurm_cluster.wait_done(job, JOB_TIMEOUT_S)
    log = job_log(slurm_cluster, job)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-5000:]}"
    resumed = step_losses(metric_rows(run_b)[before:])
    assert [s for s, _ in resumed] == list(range(step + 1, STEPS + 1))
    assert all(math.isfinite(v) for _, v in resumed)
    final = latest_checkpoint(run_b)
    assert json.loads((final / "trainer_state.json").read_text())["world_size"] == 2
