"""Checks of the files a run starts from, before anything heavy loads them.

:func:`check_paths` is what ``python -m videoflash.train`` runs right after :func:`validate`: the
checkpoint ``resume=<dir>`` names, the HF directory of ``stage.init``, and -- when the stage starts
from parts and its starting point is not written yet -- ``model.vision.pretrained``,
``model.text.pretrained`` and ``model.tokenizer.path``. A missing or damaged one is a
:class:`~.validate.ConfigError` naming the key and the path (exit status 2), in a second, instead
of a traceback after the model is built. It is not part of :func:`validate`, which also runs where
the files need not exist yet (a SLURM chain submits stage N+1 before stage N has written its export).

:func:`hf_dir_problems` reads only what is cheap: every JSON file of the directory must parse, the
weights index must name shards that exist, and every safetensors file must be as long as its header
says (8-byte header length, JSON header, then the tensors' bytes), which catches truncated and
garbled shards by name. The export (``python -m videoflash.export``) runs it on its source.

Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from pathlib import Path

from .schema import VideoFlashSchema
from .validate import ConfigError

#: an HF hub repository id (``org/name`` or ``name``), as opposed to a local path
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file at ``path`` is unreadable, or None when its layout is whole."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path} is truncated ({size} bytes, no safetensors header)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path} is truncated or not a safetensors file (header of {n} bytes in a file of {size})"
            header = json.loads(f.read(n))
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (ValueError, AttributeError, KeyError, TypeError, IndexError) as err:
        return f"{path} has a garbled safetensors header ({type(err).__name__}: {err})"
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"{path} has {size} bytes, its safetensors header says {expected} (truncated or damaged)"
    return None


def torch_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a file of ``torch.save``, or None: a zip archive whose directory
    reads (torch's format), or a pickle (torch's old format)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        try:
            zipfile.ZipFile(path).close()
        except zipfile.BadZipFile as err:
            return f"{path} is truncated or damaged ({err})"
        return None
    if head[:1] != b"\x80":  # the pickle protocol opcode that starts torch's old format
        return f"{path} is not a torch file ({len(head)} first bytes {head!r})"
    return None


def hf_dir_problems(path: str | os.PathLike, need_weights: bool = True) -> list[str]:
    """What is wrong with the HF model directory ``path`` (empty: looks whole); see module doc."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a directory"]
    problems, parsed = [], {}
    if not (path / "config.json").is_file() and need_weights:
        problems.append(f"{path} holds no config.json (not an HF model directory)")
    for f in sorted(path.glob("*.json")):
        try:
            parsed[f.name] = json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            problems.append(f"{f} is not valid JSON ({err})")
    if not need_weights:
        return problems
    index = parsed.get("model.safetensors.index.json")
    shards = sorted(path.glob("*.safetensors"))
    if isinstance(index, dict):
        listed = sorted(set(index.get("weight_map", {}).values()))
        problems += [f"{path / s}, listed in model.safetensors.index.json, is missing"
                     for s in listed if not (path / s).is_file()]
    elif not shards and not any(path.glob("*.bin")):
        problems.append(f"{path} holds no weights (*.safetensors)")
    problems += [p for s in shards if (p := safetensors_problem(s))]
    return problems


def _hub_or_dir(key: str, value: str, need_weights: bool) -> None:
    """A local HF directory (checked) or a hub id (checked in the local cache when offline)."""
    path = Path(value).expanduser()
    if path.exists():
        if problems := hf_dir_problems(path, need_weights):
            raise ConfigError(key, f"{value}: " + "; ".join(problems))
        return
    if not _HUB_ID.match(value):
        raise ConfigError(key, f"{value}: no such directory")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(value, "config.json" if need_weights else "tokenizer_config.json"), str):
            raise ConfigError(key, f"{value}: no such directory, and HF_HUB_OFFLINE is set while the hub repo "
                                   "is not in the local cache")


def check_paths(cfg: VideoFlashSchema) -> None:
    """Raise :class:`ConfigError` for a starting file of this run that is missing or damaged."""
    if cfg.resume not in ("auto", "never"):
        path = Path(cfg.resume)
        if not path.is_dir():
            raise ConfigError("resume", f"{path}: no such checkpoint directory (resume takes auto, never or a "
                                        "checkpoints/step_XXXXXXXX directory)")
        if not (path / "trainer_state.json").is_file():
            raise ConfigError("resume", f"{path}: not a checkpoint directory (no trainer_state.json); "
                                        "point it at a checkpoints/step_XXXXXXXX directory")
    stage, m = cfg.stage, cfg.model
    if stage.init not in (None, "parts"):
        if problems := hf_dir_problems(stage.init):
            raise ConfigError("stage.init", f"{stage.init}: " + "; ".join(problems)
                              + " (stage.init takes an HF export directory, 'parts', or null)")
    from_parts = stage.init == "parts" or (stage.init is None and stage.id == 1)
    if not from_parts or (Path(cfg.run_root) / f"stage{stage.id}" / "init" / "config.json").is_file():
        return  # the starting point does not need the parts, or was already built from them
    if m.vision.pretrained is not None:
        path = Path(m.vision.pretrained).expanduser()
        if not path.is_file():
            raise ConfigError("model.vision.pretrained", f"{path}: no such file (the UMT weights, UMT-L_f4_vision.pt)")
        if problem := torch_file_problem(path):
            raise ConfigError("model.vision.pretrained", problem)
    if m.text.pretrained is not None:
        _hub_or_dir("model.text.pretrained", m.text.pretrained, need_weights=True)
    if m.tokenizer.kind == "pretrained" and m.tokenizer.path:
        _hub_or_dir("model.tokenizer.path", m.tokenizer.path, need_weights=False)
