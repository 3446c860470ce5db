"""What an export knows about the training run behind a checkpoint.

The source of an export is either an HF checkpoint directory (``config.json`` + safetensors) or a
training run directory. The trainer (``videoflash/train``) writes, per stage::

    <run_root>/stage<N>/config.yaml         the resolved Hydra config of the stage
    <run_root>/stage<N>/metrics.jsonl       one record per optimizer step, plus events
    <run_root>/stage<N>/export/             the stage-end HF export (+ training_state.json)

and evaluations write JSON result files beside them (``eval*.json``, ``results*.json`` or files
under ``eval/``). :func:`resolve_source` picks the checkpoint (a run root: the latest stage with a
complete export), :func:`gather_run_info` reads what is there, and records what is missing so the
model card can say so rather than guess.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: evaluation result files: ``python -m videoflash.eval ... --json <file>`` wherever it was pointed
#: (name it eval*.json), ``quickstart.json`` of ``make quickstart`` in the run root (one row per stage)
EVAL_PATTERNS = ("eval*.json", "results*.json", "eval/*.json", "eval/**/*.json", "quickstart.json")
#: keys whose values are per-sample records, not results
SKIP_KEYS = ("predictions", "samples_detail")


@dataclass
class Source:
    """Where the weights come from: ``checkpoint`` (an HF directory) and, for a run, its root and stage."""

    given: Path
    checkpoint: Path
    run_root: Path | None = None
    stage_id: int | None = None

    @property
    def stage_dir(self) -> Path | None:
        return None if self.run_root is None or self.stage_id is None else self.run_root / f"stage{self.stage_id}"


@dataclass
class RunInfo:
    source: Source
    stage_config: dict | None = None  # the chosen stage's resolved config.yaml
    stages: list[dict] = field(default_factory=list)  # one summary per stage of the run root
    metrics: dict | None = None  # summary of the chosen stage's metrics.jsonl
    eval_results: list[tuple[str, dict[str, float]]] = field(default_factory=list)
    training_state: dict | None = None
    missing: list[str] = field(default_factory=list)

    def frame_policy(self) -> dict[str, Any]:
        """The stage's frame policy (``frame_policy``, ``min_frames``, ``max_frames``) and image mode."""
        stage = (self.stage_config or {}).get("stage") or {}
        frames = stage.get("frames") or {}
        out = {}
        if frames.get("sampling"):
            out["frame_policy"] = str(frames["sampling"])
        if frames.get("min_frames") is not None:
            out["min_frames"] = int(frames["min_frames"])
        if frames.get("max_frames") is not None:
            out["max_frames"] = int(frames["max_frames"])
        if stage.get("image_mode") in ("anyres", "square"):
            out["image_mode"] = stage["image_mode"]
        return out


def _stage_number(path: Path) -> int | None:
    m = re.fullmatch(r"stage(\d+)", path.name)
    return int(m.group(1)) if m else None


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    )


def resolve_source(path) -> Source:
    """Find the checkpoint behind ``path``: an HF directory, a stage directory (its ``export/``) or a
    run root (the highest-numbered stage whose ``export/`` is complete)."""
    given = Path(path).expanduser().resolve()
    if not given.exists():
        raise FileNotFoundError(f"{given} does not exist")
    if _is_checkpoint(given):
        stage_dir = given.parent if given.name == "export" else None
        if stage_dir is not None and _stage_number(stage_dir) is not None:
            return Source(given, given, stage_dir.parent, _stage_number(stage_dir))
        return Source(given, given)
    if _stage_number(given) is not None and _is_checkpoint(given / "export"):
        return Source(given, given / "export", given.parent, _stage_number(given))
    stages = sorted(
        (n, d) for d in given.iterdir() if d.is_dir() and (n := _stage_number(d)) is not None and _is_checkpoint(d / "export")
    )
    if not stages:
        raise FileNotFoundError(
            f"{given} is neither an HF checkpoint (config.json + *.safetensors) nor a run directory with "
            "stage<N>/export/ inside; point at a stage's export/ folder or at the run root"
        )
    n, d = stages[-1]
    return Source(given, d / "export", given, n)


def _load_yaml(path: Path) -> dict | None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def summarize_metrics(path: Path) -> dict | None:
    """Steps, final and smoothed loss, tokens and time from a ``metrics.jsonl``."""
    if not path.is_file():
        return None
    steps, events = [], []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "event" in rec:
            events.append(rec)
        elif "step" in rec and "loss" in rec:
            steps.append(rec)
    if not steps:
        return {"steps": 0, "events": [e.get("event") for e in events]}
    # a resumed stage may repeat steps: keep the last record of each step
    by_step = {int(r["step"]): r for r in steps}
    ordered = [by_step[k] for k in sorted(by_step)]
    losses = [float(r["loss"]) for r in ordered if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    tail = losses[-10:]
    out = {
        "steps": ordered[-1]["step"],
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "final_loss_mean10": sum(tail) / len(tail) if tail else None,
        "samples": sum(int(r.get("samples", 0)) for r in ordered),
        "tokens": sum(int(r.get("tokens", 0)) for r in ordered),
        "visual_tokens": sum(int(r.get("visual_tokens", 0)) for r in ordered),
        "train_seconds": sum(float(r.get("s_per_step", 0.0)) for r in ordered),
        "events": [e.get("event") for e in events],
    }
    if out["train_seconds"] > 0:
        out["tokens_per_s"] = out["tokens"] / out["train_seconds"]
    mfu = [float(r["mfu"]) for r in ordered if isinstance(r.get("mfu"), (int, float))]
    if mfu:
        out["mfu_mean"] = sum(mfu) / len(mfu)
    return out


def flatten_numbers(data: Any, prefix: str = "") -> dict[str, float]:
    """Every number of a nested JSON value, keyed by its path (``a/b/0``)."""
    out: dict[str, float] = {}
    if isinstance(data, bool):
        return out
    if isinstance(data, (int, float)):
        if math.isfinite(float(data)):
            out[prefix or "value"] = data
    elif isinstance(data, dict):
        for k, v in data.items():
            if k in SKIP_KEYS:
                continue
            out.update(flatten_numbers(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            # rows of a per-stage table (quickstart.json) are named by their stage
            name = f"stage{v['stage']}" if isinstance(v, dict) and isinstance(v.get("stage"), int) else str(i)
            if isinstance(v, dict) and name.startswith("stage"):
                v = {k: x for k, x in v.items() if k != "stage"}
            out.update(flatten_numbers(v, f"{prefix}/{name}" if prefix else name))
    return out


def find_eval_results(*dirs: Path | None) -> list[tuple[str, dict[str, float]]]:
    """Numbers of the evaluation result files in ``dirs`` (see :data:`EVAL_PATTERNS`)."""
    found, seen = [], set()
    for d in dirs:
        if d is None or not d.is_dir():
            continue
        for pattern in EVAL_PATTERNS:
            for f in sorted(d.glob(pattern)):
                if f in seen or not f.is_file():
                    continue
                seen.add(f)
                try:
                    numbers = flatten_numbers(json.loads(f.read_text()))
                except (OSError, json.JSONDecodeError):
                    continue
                if numbers:
                    found.append((str(f.relative_to(d.parent) if d.parent in f.parents else f), numbers))
    return found


def gather_run_info(source: Source) -> RunInfo:
    info = RunInfo(source)
    state_file = source.checkpoint / "training_state.json"
    if state_file.is_file():
        try:
            info.training_state = json.loads(state_file.read_text())
        except json.JSONDecodeError:
            info.missing.append(f"{state_file} is not valid JSON")
    if source.run_root is None:
        info.missing.append(
            "the export was made from a bare checkpoint directory, so the training recipe, stage, data mix "
            "and training metrics are not known (export from the run directory to include them)"
        )
        info.eval_results = find_eval_results(source.checkpoint)
        if not info.eval_results:
            info.missing.append("no evaluation results were found beside the checkpoint")
        return info
    for d in sorted(source.run_root.iterdir()):
        n = _stage_number(d) if d.is_dir() else None
        if n is None:
            continue
        cfg = _load_yaml(d / "config.yaml") or {}
        stage = cfg.get("stage") or {}
        metrics = summarize_metrics(d / "metrics.jsonl")
        state = None
        if (d / "export" / "training_state.json").is_file():
            try:
                state = json.loads((d / "export" / "training_state.json").read_text())
            except json.JSONDecodeError:
                state = None
        info.stages.append({
            "id": n,
            "name": stage.get("name"),
            "trainable": stage.get("trainable"),
            "lr": stage.get("lr"),
            "vision_lr": stage.get("vision_lr"),
            "global_batch_size": stage.get("global_batch_size"),
            "frames": stage.get("frames"),
            "max_tokens": stage.get("max_tokens"),
            "image_size": stage.get("image_size"),
            "steps": (metrics or {}).get("steps", (state or {}).get("step")),
            "final_loss": (metrics or {}).get("final_loss"),
            "completed": bool((state or {}).get("completed", False)),
            "exported": _is_checkpoint(d / "export"),
        })
    stage_dir = source.stage_dir
    info.stage_config = _load_yaml(stage_dir / "config.yaml") if stage_dir else None
    if info.stage_config is None:
        info.missing.append(f"{stage_dir}/config.yaml is missing: the stage's recipe and data mix are unknown")
    info.metrics = summarize_metrics(stage_dir / "metrics.jsonl") if stage_dir else None
    if info.metrics is None:
        info.missing.append(f"{stage_dir}/metrics.jsonl is missing: no training curve to report")
    info.eval_results = find_eval_results(stage_dir, source.run_root, source.checkpoint)
    if not info.eval_results:
        info.missing.append(
            "no evaluation results were found in the run directory "
            f"(looked for {', '.join(EVAL_PATTERNS)} in the stage directory and the run root)"
        )
    return info
