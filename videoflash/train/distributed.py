"""Processes, ranks and the process group.

Three ways a run starts, told apart by the environment:

- **torchrun** (or any ``env://`` launcher): ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` are set.
- **srun** starting one task per GPU: ``SLURM_PROCID``, ``SLURM_LOCALID`` and ``SLURM_STEP_NUM_TASKS``
  (or ``SLURM_NTASKS``) are copied to the torch variables; ``MASTER_ADDR`` defaults to the first
  node of the step and ``MASTER_PORT`` to a port derived from the job id.
- **bare** ``python -m videoflash.train``: one process on CPU or one GPU; with several GPUs visible
  it re-executes itself under ``torch.distributed.run`` with one process per GPU, and on CPU with
  ``launcher.nproc_per_node`` processes when that is set above 1 (:func:`maybe_relaunch`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    launcher: str  # torchrun | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _slurm_first_host(environ: Mapping[str, str]) -> str | None:
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        hosts = out.stdout.split()
        if out.returncode == 0 and hosts:
            return hosts[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    if "[" not in nodelist and "," not in nodelist:  # a single plain host name
        return nodelist
    return None


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Ranks from the environment (see the module docstring); does not touch it."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "torchrun")
    tasks = env.get("SLURM_STEP_NUM_TASKS")  # set by srun for the tasks of a step, not in batch scripts
    if "SLURM_PROCID" in env and tasks:
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(tasks), "slurm")
    return DistEnv(0, 0, 1, "single")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_env(info: DistEnv) -> None:
    """Make ``env://`` rendezvous work for every launcher: torch's variables plus a master address."""
    os.environ["RANK"] = str(info.rank)
    os.environ["LOCAL_RANK"] = str(info.local_rank)
    os.environ["WORLD_SIZE"] = str(info.world_size)
    if info.launcher == "slurm":
        if "MASTER_ADDR" not in os.environ:
            host = _slurm_first_host(os.environ)
            if host is None:
                raise RuntimeError("under srun without MASTER_ADDR and the node list cannot be read; export MASTER_ADDR")
            os.environ["MASTER_ADDR"] = host
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    elif info.launcher == "single":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def relaunch_count(nproc_per_node: int | None, gpus: int) -> int:
    """How many processes a bare run should become: on GPUs ``nproc_per_node`` (null = one per
    visible GPU); on CPU one, unless ``nproc_per_node`` asks for more (data-parallel ranks over gloo,
    e.g. one per core)."""
    nproc = nproc_per_node if nproc_per_node is not None else max(gpus, 1)
    if gpus and nproc > gpus:
        raise RuntimeError(f"launcher.nproc_per_node={nproc} but only {gpus} GPUs are visible")
    return nproc


def maybe_relaunch(nproc_per_node: int | None, argv: list[str]) -> None:
    """Bare ``python -m videoflash.train``: re-execute under ``torch.distributed.run`` when
    :func:`relaunch_count` is above 1 (this process is replaced)."""
    if detect().launcher != "single":
        return
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nproc = relaunch_count(nproc_per_node, gpus)
    if nproc <= 1:
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "videoflash.train", *argv]
    where = f"{gpus} GPUs visible" if gpus else f"CPU, launcher.nproc_per_node={nproc}"
    # torchrun would set OMP_NUM_THREADS=1 and warn; set it here (train.cpu_threads still rules torch)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    print(f"[videoflash] {where}: starting {nproc} processes: {' '.join(cmd)}", flush=True)
    sys.stdout.flush()
    os.execv(sys.executable, cmd)


def device_for(info: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(info: DistEnv, backend: str = "auto", timeout_min: int = 30) -> torch.device:
    """Start the process group (also for one process: DeepSpeed needs it) and pick the device."""
    export_env(info)
    device = device_for(info)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(minutes=timeout_min)}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=timeout_min))
    return device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_max(value: float, device: torch.device) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
