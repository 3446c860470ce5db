"""Periodic checkpoints of a stage: durable, verifiable, loaded as data, the last k kept.

Layout (``<run_root>/stage<N>/checkpoints/``)::

    step_00000040/
        deepspeed/               DeepSpeed's own files: model + optimizer partitions of every rank,
                                 the LR scheduler (engine.save_checkpoint)
        rank00000.pt, rank00001.pt   per-rank state: data-loader position and RNG states, plain
                                 containers and tensors only (loaded with ``weights_only=True``)
        trainer_state.json       step, tokens and samples seen, elapsed time, world size
        manifest.json            every file above with its size, and a SHA-256 of the small ones
    latest                       the name of the newest complete checkpoint (one line)

**Writing.** Every rank writes into ``.tmp_step_...`` and fsyncs what it wrote (its rank file and
DeepSpeed's files that carry its rank). After a barrier rank 0 writes ``trainer_state.json`` and
then ``manifest.json`` (the last file), fsyncs every file and directory of the tree, renames it into
place, fsyncs the parent, and rewrites ``latest`` through a temporary file, ``fsync`` and
``os.replace``. A crash or power loss at any point leaves the previous checkpoint and ``latest``
intact. A write that fails on any rank -- a full disk above all, which torch reports only as a
stream error -- raises :class:`CheckpointWriteError` on every rank, naming the path and the free
space; the partial directory is removed and ``latest`` is not touched.

**Finding.** :meth:`CheckpointManager.latest` checks the checkpoint ``latest`` names against its
manifest (every file present with its size, the small ones with their hash). A pointer that is
garbled or names a missing or damaged checkpoint falls back to the newest intact one, with a
warning naming both; when checkpoints exist but none is intact, :class:`CheckpointError` says so
rather than starting the stage over. Leftover ``.tmp_*`` directories are removed on the next save
or load.

**Loading as data.** A checkpoint is a set of pickles. Before anything is unpickled, the per-rank
state is read with ``weights_only=True`` and every DeepSpeed file is scanned for the globals its
pickle names (``torch.serialization.get_unsafe_globals_in_checkpoint``, which runs nothing);
anything beyond tensors, plain containers and :data:`DEEPSPEED_GLOBALS` is refused with the file
and the global named, because DeepSpeed itself unpickles its files without restriction. The
explicit opt-in is ``trust_pickle=True`` (config ``train.trust_checkpoint_pickle``).
"""

from __future__ import annotations

import errno
import hashlib
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

from videoflash.model.safe_load import CorruptFileError, UnsafePickleError, load_torch_file, unsafe_globals

from . import distributed

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
DS_TAG = "deepspeed"
#: the same checkpoint converted for another number of ranks (DeepSpeed universal checkpoint)
UNIVERSAL_TAG = "deepspeed_universal"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
#: files up to this size get a SHA-256 in the manifest (rank states, JSON, small DeepSpeed files)
HASHED_BYTES = 1 << 20
#: what DeepSpeed's checkpoint files name besides tensors and plain containers (0.19: the loss scaler
#: of the optimizer state and the ZeRO stage enum)
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)
#: rank files of videoflash before this format pickled numpy's RNG state as an ndarray
_LEGACY_RANK_GLOBALS = (np.ndarray, np.dtype, np.dtype(np.uint32).__class__,
                        getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct)
#: torch reports a failed write as a stream error without errno: this little space left means a full disk
LOW_SPACE_BYTES = 64 << 20
_OPT_IN = "train.trust_checkpoint_pickle=true (CheckpointManager(..., trust_pickle=True))"
_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: damaged, incomplete, or holding more than data."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, quota, I/O error); the previous one is intact."""


# -- RNG state as plain data ------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as plain containers, ints, floats and tensors."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),  # (version, tuple of ints, None or float)
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_plain(obj: Any, where: str = "rank_state") -> None:
    """Raise ``TypeError`` naming the first value that is not a plain container, number, string,
    None or tensor: the rank state must load back with ``weights_only=True``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where} has a key of type {type(k).__name__}: {k!r}")
            check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__name__}; a checkpoint's rank state "
                        "holds dicts, lists, tuples, str, int, float, bool, None and tensors only")


# -- durable files ---------------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root: Path, select=lambda name: True) -> None:
    """fsync the selected files under ``root``, every directory of it, and ``root`` itself."""
    for folder, _, files in os.walk(root):
        for name in files:
            if select(name):
                _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


def _write_synced(path: Path, data: bytes | None = None, obj: Any = None) -> None:
    """Write ``data`` (or ``torch.save(obj)``) to ``path`` and fsync it before returning."""
    with open(path, "wb") as f:
        if data is not None:
            f.write(data)
        else:
            torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_manifest(root: Path) -> dict[str, Any]:
    """Every file under ``root`` but the manifest (relative path -> size, and SHA-256 when small)."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in sorted(names):
            p = Path(folder) / name
            if p == root / MANIFEST:
                continue
            size = p.stat().st_size
            rec: dict[str, Any] = {"bytes": size}
            if size <= HASHED_BYTES:
                rec["sha256"] = _sha256(p)
            files[p.relative_to(root).as_posix()] = rec
    return {"version": 1, "files": dict(sorted(files.items()))}


def verify(path: str | os.PathLike) -> list[str]:
    """What is wrong with the checkpoint directory ``path`` (empty: intact). Checks the manifest
    (every file present, of its size, small ones with their hash) and that the trainer state reads;
    a checkpoint of an older videoflash without a manifest is checked for its files' presence."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a directory"]
    problems = []
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
            if not all(isinstance(r, dict) and isinstance(r.get("bytes"), int) for r in files.values()):
                raise ValueError("a file record without its size")
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            return [f"{manifest} is unreadable ({type(err).__name__}: {err})"]
        for rel, rec in files.items():
            p = path / rel
            if not p.is_file():
                problems.append(f"{p} is missing")
            elif p.stat().st_size != rec["bytes"]:
                problems.append(f"{p} has {p.stat().st_size} bytes, the manifest says {rec['bytes']} (truncated?)")
            elif "sha256" in rec and _sha256(p) != rec["sha256"]:
                problems.append(f"{p} does not match its SHA-256 in the manifest (changed or damaged)")
        if problems:
            return problems
    try:
        world = int(json.loads((path / TRAINER_STATE).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{path / TRAINER_STATE} is missing or unreadable ({type(err).__name__}: {err})"]
    if not manifest.is_file():  # written before checkpoints had manifests
        problems += [f"{p} is missing" for r in range(world) if not (p := path / f"rank{r:05d}.pt").is_file()]
        if not (path / DS_TAG).is_dir():
            problems.append(f"{path / DS_TAG} is missing")
    return problems


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _write_problem(err: BaseException, where: Path) -> str | None:
    """A sentence about a failed checkpoint write, or None when ``err`` is no write failure."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    if not isinstance(err, OSError) and not re.search(r"PytorchStreamWriter|file write failed|unexpected pos", text):
        return None
    free = _free_bytes(where)
    if full or (free is not None and free < LOW_SPACE_BYTES):
        return (f"no space left to write the checkpoint into {where} ({free} bytes free on its file system; "
                f"{text})")
    return f"writing the checkpoint into {where} failed: {text} ({free} bytes free on its file system)"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointManager:
    def __init__(self, directory: str | os.PathLike, keep: int, rank: int, world_size: int,
                 trust_pickle: bool = False):
        self.dir = Path(directory)
        self.keep = keep
        self.rank = rank
        self.world_size = world_size
        self.trust_pickle = trust_pickle

    # -- finding ----------------------------------------------------------------------------------
    def complete(self) -> list[Path]:
        """Checkpoint directories that were renamed into place, oldest first (not yet verified)."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The intact checkpoint ``latest`` names, else the newest intact one (with a warning that
        names the damaged one); None when there is no checkpoint at all."""
        pointer = self.dir / "latest"
        named, doubt = None, None
        if pointer.is_file():
            text = pointer.read_bytes().decode("utf-8", "replace").strip()
            if _STEP_DIR.match(text) and (self.dir / text).is_dir():
                named = self.dir / text
                problems = verify(named)
                if not problems:
                    return named
                doubt = f"checkpoint {named} is not intact ({problems[0]})"
            else:
                doubt = f"{pointer} holds {text[:60]!r}, which names no checkpoint directory"
        found = [p for p in reversed(self.complete()) if p != named]
        rejected = [named] if named else []
        for path in found:
            problems = verify(path)
            if not problems:
                if doubt:
                    log.warning("%s; resuming from %s, the newest intact checkpoint", doubt, path)
                elif rejected:
                    log.warning("resuming from %s; skipped %s", path, ", ".join(map(str, rejected)))
                return path
            log.warning("checkpoint %s is not intact (%s)", path, problems[0])
            rejected.append(path)
        if rejected:
            raise CheckpointError(
                f"no intact checkpoint in {self.dir} (damaged: {', '.join(map(str, rejected))}); "
                "restore one, point resume=<dir> at one, or start over with resume=never"
            )
        return None

    def _remove_leftovers(self) -> None:
        if self.rank == 0 and self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith(".tmp_"):
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)

    # -- saving -----------------------------------------------------------------------------------
    def save(self, engine, step: int, trainer_state: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it at the same step."""
        check_plain(rank_state)
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f".tmp_{step_dir_name(step)}"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
            tmp.mkdir()
        distributed.barrier()
        mine = f"_pp_rank_{self.rank}_"  # DeepSpeed's files of this rank: zero_pp_rank_<r>_mp_rank_00_*.pt
        problem = self._attempt(tmp, lambda: (
            engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False),
            _write_synced(tmp / f"rank{self.rank:05d}.pt", obj=rank_state),
            sync_tree(tmp / DS_TAG, lambda name: mine in name),
        ))
        self._raise_if_any(problem, tmp)
        problem = None
        if self.rank == 0:
            problem = self._attempt(tmp, lambda: self._publish(tmp, final, trainer_state))
        self._raise_if_any(distributed.broadcast_object(problem), tmp)
        if self.rank == 0:
            self._prune(keep_also=final)
            log.info("checkpoint %s written", final)
        distributed.barrier()
        return final

    @staticmethod
    def _attempt(where: Path, write) -> str | None:
        """Run ``write``; a write failure becomes a sentence naming ``where``, anything else raises."""
        try:
            write()
        except (OSError, RuntimeError) as err:
            problem = _write_problem(err, where)
            if problem is None:
                raise
            return problem
        return None

    def _raise_if_any(self, problem: str | None, tmp: Path) -> None:
        """Collective: if any rank's write failed, every rank raises (rank 0 removes ``tmp``)."""
        problems = [p for p in distributed.all_gather_object(problem) if p]
        if not problems:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        distributed.barrier()
        previous = (self.dir / "latest").read_text().strip() if (self.dir / "latest").is_file() else None
        keep = f"; the previous checkpoint ({self.dir / previous}) and `latest` are intact" if previous else ""
        raise CheckpointWriteError(problems[0] + keep)

    def _publish(self, tmp: Path, final: Path, trainer_state: dict[str, Any]) -> None:
        """Rank 0: trainer state, manifest, fsync of the tree, rename, pointer."""
        state = dict(trainer_state, world_size=self.world_size)
        _write_synced(tmp / TRAINER_STATE, json.dumps(state, indent=2).encode())
        _write_synced(tmp / MANIFEST, json.dumps(build_manifest(tmp), indent=1).encode())
        sync_tree(tmp)
        if final.exists():  # the same step saved again (a resumed run that stops right away)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_path(self.dir)
        pointer_tmp = self.dir / ".tmp_latest"
        _write_synced(pointer_tmp, (final.name + "\n").encode())
        os.replace(pointer_tmp, self.dir / "latest")
        _fsync_path(self.dir)

    def _prune(self, keep_also: Path) -> None:
        done = self.complete()
        for path in done[: max(0, len(done) - self.keep)]:
            if path != keep_also:
                shutil.rmtree(path, ignore_errors=True)

    # -- loading ----------------------------------------------------------------------------------
    def written_by(self, path: str | os.PathLike) -> int:
        """The number of ranks that wrote the checkpoint at ``path``."""
        return int(json.loads((Path(path) / TRAINER_STATE).read_text())["world_size"])

    def prepare_universal(self, path: str | os.PathLike) -> None:
        """Collective. Rank 0 converts ``path``'s DeepSpeed files into a universal checkpoint once
        (``deepspeed_universal/`` beside them, written under a temporary name, then renamed), so that
        a run with another number of ranks can load it."""
        path = Path(path)
        final = path / UNIVERSAL_TAG
        if not final.is_dir():
            self._refuse_unless_data(path / DS_TAG)  # the converter unpickles them without restriction
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
            sync_tree(tmp)
            os.replace(tmp, final)
            _fsync_path(path)
        distributed.barrier()

    def deepspeed_file_problems(self, folder: Path) -> list[str]:
        """This rank's share of the DeepSpeed files under ``folder`` (every world_size-th) whose
        pickles name globals beyond :data:`DEEPSPEED_GLOBALS`, or cannot be read; DeepSpeed
        unpickles its files without restriction, so they are checked first."""
        if self.trust_pickle:
            return []
        found = []
        for f in sorted(p for p in folder.rglob("*.pt") if p.is_file())[self.rank::self.world_size]:
            try:
                bad = unsafe_globals(f, DEEPSPEED_GLOBALS)
            except RuntimeError as err:  # torch's zip reader
                found.append(f"{f} is not a complete torch file ({str(err).splitlines()[0]})")
                continue
            if bad is None:
                found.append(f"{f} is not a torch zip checkpoint, so its pickle cannot be checked")
            elif bad:
                found.append(str(UnsafePickleError(f, bad, _OPT_IN)))
        return found

    def _refuse_unless_data(self, folder: Path, rank_file: Path | None = None) -> dict[str, Any] | None:
        """Collective: check this rank's share of ``folder``'s DeepSpeed files and read its
        ``rank_file``; if anything on any rank is not plain data, every rank raises
        :class:`CheckpointError` naming the files. Returns the rank state (None without a file)."""
        found, rank_state = self.deepspeed_file_problems(folder), None
        if rank_file is not None:
            try:
                rank_state = self.read_rank_state(rank_file)
            except CheckpointError as err:
                found.append(str(err))
        found = [x for part in distributed.all_gather_object(found) for x in part]
        if found:
            raise CheckpointError("; ".join(found))
        return rank_state

    def read_rank_state(self, path: Path) -> dict[str, Any]:
        """One rank file, loaded as data (``weights_only=True``) unless ``trust_pickle``."""
        try:
            return load_torch_file(path, allowed=_LEGACY_RANK_GLOBALS, trust_pickle=self.trust_pickle, opt_in=_OPT_IN)
        except (UnsafePickleError, CorruptFileError) as err:
            raise CheckpointError(str(err)) from err

    def load(self, engine, path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore ``engine`` (model, optimizer, LR schedule) and return (trainer state, rank state).

        The checkpoint is verified and its files checked to hold data only before DeepSpeed reads
        them (:class:`CheckpointError` otherwise). A checkpoint written by another number of ranks
        is loaded from its universal conversion (:meth:`prepare_universal`, which the engine config
        must enable before ``deepspeed.initialize``); the rank state's ``loader`` is then the list of
        every old rank's loader state, from which the loader deals the rest of the epoch to the new
        ranks."""
        path = Path(path)
        problems = distributed.broadcast_object(verify(path) if self.rank == 0 else None)
        if problems:
            raise CheckpointError(f"checkpoint {path} is not intact: " + "; ".join(problems))
        state = json.loads((path / TRAINER_STATE).read_text())
        self._remove_leftovers()
        if state.get("world_size") != self.world_size:
            return state, self._load_universal(engine, path, state)
        rank_state = self._refuse_unless_data(path / DS_TAG, path / f"rank{self.rank:05d}.pt")
        load_path, _ = engine.load_checkpoint(
            str(path), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path / DS_TAG}")
        return state, rank_state

    def _load_universal(self, engine, path: Path, state: dict[str, Any]) -> dict[str, Any]:
        # RNG from the same rank of the old run (or its last one); the data position from all old ranks
        src = path / f"rank{min(self.rank, state['world_size'] - 1):05d}.pt"
        rank_state = self._refuse_unless_data(path / UNIVERSAL_TAG, src)
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
        rank_state["loader"] = self.loader_states(path)
        return rank_state

    def loader_states(self, path: str | os.PathLike) -> list[dict[str, Any]]:
        """Every rank's loader state in the checkpoint at ``path`` (each rank file is small: a loader
        state and RNG states), for a loader that continues with another world size or worker count."""
        path = Path(path)
        ranks = self.written_by(path)
        return [self.read_rank_state(path / f"rank{r:05d}.pt")["loader"] for r in range(ranks)]
