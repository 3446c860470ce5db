"""Periodic checkpoints of a stage: atomic, the last k kept, resumable to the exact step.

Layout (``<run_root>/stage<N>/checkpoints/``)::

    step_00000040/
        deepspeed/               DeepSpeed's own files: model + optimizer partitions of every rank,
                                 the LR scheduler (engine.save_checkpoint)
        rank00000.pt, rank00001.pt   per-rank state: data-loader position and RNG states
        trainer_state.json       step, tokens and samples seen, elapsed time, world size
    latest                       the name of the newest complete checkpoint (one line)

A checkpoint is written into ``.tmp_step_...`` by every rank, then, after a barrier, rank 0 renames
the directory into place and rewrites ``latest`` through a temporary file and ``os.replace``; a crash
at any point leaves the previous checkpoint and ``latest`` intact. Leftover ``.tmp_*`` directories
are removed on the next save or load.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
DS_TAG = "deepspeed"
#: the same checkpoint converted for another number of ranks (DeepSpeed universal checkpoint)
UNIVERSAL_TAG = "deepspeed_universal"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointManager:
    def __init__(self, directory: str | os.PathLike, keep: int, rank: int, world_size: int):
        self.dir = Path(directory)
        self.keep = keep
        self.rank = rank
        self.world_size = world_size

    # -- finding ----------------------------------------------------------------------------------
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, or the newest complete one if ``latest`` is missing."""
        pointer = self.dir / "latest"
        if pointer.is_file():
            path = self.dir / pointer.read_text().strip()
            if path.is_dir():
                return path
        done = self.complete()
        return done[-1] if done else None

    def _remove_leftovers(self) -> None:
        if self.rank == 0 and self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith(".tmp_"):
                    shutil.rmtree(p, ignore_errors=True)

    # -- saving -----------------------------------------------------------------------------------
    def save(self, engine, step: int, trainer_state: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it at the same step."""
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f".tmp_{step_dir_name(step)}"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
            tmp.mkdir()
        distributed.barrier()
        engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
        torch.save(rank_state, tmp / f"rank{self.rank:05d}.pt")
        if self.rank == 0:
            state = dict(trainer_state, world_size=self.world_size)
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        distributed.barrier()
        if self.rank == 0:
            if final.exists():  # the same step saved again (a resumed run that stops right away)
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer_tmp = self.dir / ".tmp_latest"
            with open(pointer_tmp, "w") as f:
                f.write(final.name + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(pointer_tmp, self.dir / "latest")
            self._prune(keep_also=final)
            log.info("checkpoint %s written", final)
        distributed.barrier()
        return final

    def _prune(self, keep_also: Path) -> None:
        done = self.complete()
        for path in done[: max(0, len(done) - self.keep)]:
            if path != keep_also:
                shutil.rmtree(path, ignore_errors=True)

    # -- loading ----------------------------------------------------------------------------------
    def written_by(self, path: str | os.PathLike) -> int:
        """The number of ranks that wrote the checkpoint at ``path``."""
        return int(json.loads((Path(path) / "trainer_state.json").read_text())["world_size"])

    def prepare_universal(self, path: str | os.PathLike) -> None:
        """Collective. Rank 0 converts ``path``'s DeepSpeed files into a universal checkpoint once
        (``deepspeed_universal/`` beside them, written under a temporary name, then renamed), so that
        a run with another number of ranks can load it."""
        path = Path(path)
        final = path / UNIVERSAL_TAG
        if self.rank == 0 and not final.is_dir():
            import subprocess
            import sys

            tmp = path / f".tmp_{UNIVERSAL_TAG}"
            shutil.rmtree(tmp, ignore_errors=True)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path / DS_TAG),
                   "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
                   "--num_merge_workers", "1"]
            log.info("converting %s to a universal checkpoint: %s", path, " ".join(cmd))
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"converting {path} to a universal checkpoint failed:\n{done.stderr[-2000:]}")
            os.replace(tmp, final)
        distributed.barrier()

    def load(self, engine, path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore ``engine`` (model, optimizer, LR schedule) and return (trainer state, rank state).

        A checkpoint written by another number of ranks is loaded from its universal conversion
        (:meth:`prepare_universal`, which the engine config must enable before
        ``deepspeed.initialize``); the rank state's ``loader`` is then the list of every old rank's
        loader state, from which the loader deals the rest of the epoch to the new ranks."""
        path = Path(path)
        state = json.loads((path / "trainer_state.json").read_text())
        self._remove_leftovers()
        if state.get("world_size") != self.world_size:
            return state, self._load_universal(engine, path, state)
        load_path, _ = engine.load_checkpoint(
            str(path), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path / DS_TAG}")
        rank_state = torch.load(path / f"rank{self.rank:05d}.pt", map_location="cpu", weights_only=False)
        return state, rank_state

    def _load_universal(self, engine, path: Path, state: dict[str, Any]) -> dict[str, Any]:
        optimizer = engine.optimizer
        groups = optimizer.param_groups
        settings = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in groups]
        load_path, _ = engine.load_checkpoint(
            str(path), tag=UNIVERSAL_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the universal checkpoint in {path / UNIVERSAL_TAG}")
        # DeepSpeed 0.19 gives every group group 0's settings and one shared Adam step tensor:
        # restore each group's own settings and learning rate, and give each state its own step.
        for group, kept, lr in zip(groups, settings, engine.lr_scheduler.get_last_lr()):
            group.update(kept)
            group["lr"] = lr
        for st in optimizer.optimizer.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()
        # RNG from the same rank of the old run (or its last one); the data position from all old ranks
        src = path / f"rank{min(self.rank, state['world_size'] - 1):05d}.pt"
        rank_state = torch.load(src, map_location="cpu", weights_only=False)
        rank_state["loader"] = self.loader_states(path)
        return rank_state

    def loader_states(self, path: str | os.PathLike) -> list[dict[str, Any]]:
        """Every rank's loader state in the checkpoint at ``path`` (each rank file is small: a loader
        state and RNG states), for a loader that continues with another world size or worker count."""
        path = Path(path)
        ranks = self.written_by(path)
        return [torch.load(path / f"rank{r:05d}.pt", map_location="cpu", weights_only=False)["loader"]
                for r in range(ranks)]  # fmt: skip
