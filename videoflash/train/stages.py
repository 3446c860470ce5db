"""What a stage trains, from where it starts, and how fast each part learns.

- :func:`init_source`: stage N starts from stage N-1's export in the same run root (``stage.init``
  null), stage 1 from parts (the LLM + UMT weights + a new connector); ``stage.init`` may name any
  HF directory instead, or ``parts``.
- :func:`apply_trainable`: freeze everything, then unfreeze the stage's parts
  (``vision_tower``, ``connector``, ``language_model``; the LLM includes embeddings and head) and
  every adapter tensor (``stage.adapter``, :mod:`adapters`); :func:`adapted_parts` names the parts
  adapters sit in (gradients flow through them although their own weights stay frozen).
- the fine-tuning stage (``stage=finetune``, id 5) starts from ``stage.init``, a converted release
  or any export.
- :func:`param_groups`: AdamW groups per part with the part's learning rate (encoder ``vision_lr``,
  connector ``connector_lr``, LLM ``lr``); only parameters that require grad; biases and norms
  without weight decay when it is non-zero.
- :func:`lr_lambda`: linear warm-up over ``warmup_ratio`` of the steps, then cosine (or linear) decay
  to ``min_lr_ratio``; a torch ``LambdaLR`` on top of it is stepped by DeepSpeed and checkpointed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from videoflash.config.schema import TRAINABLE_PARTS, StageSchema

from .adapters import TARGET_PATTERNS, is_adapter_param


@dataclass(frozen=True)
class InitSource:
    kind: str  # parts | pretrained
    path: Path | None = None  # the HF directory for "pretrained"


def stage_dir(run_root: str | os.PathLike, stage_id: int) -> Path:
    return Path(run_root) / f"stage{stage_id}"


def export_dir(run_root: str | os.PathLike, stage_id: int) -> Path:
    return stage_dir(run_root, stage_id) / "export"


class MissingStartError(FileNotFoundError):
    """The stage's starting point (the previous export, or ``stage.init``) does not exist."""


def init_source(stage: StageSchema, run_root: str | os.PathLike) -> InitSource:
    """Where this stage's weights come from; raises :class:`MissingStartError` with advice."""
    if stage.init == "parts" or (stage.init is None and stage.id == 1):
        return InitSource("parts")
    if stage.init is None:
        path = export_dir(run_root, stage.id - 1)
        hint = f"run stage={stage.id - 1} first (same run_root), or set stage.init=<HF directory>"
    else:
        path = Path(stage.init)
        hint = "stage.init must be an HF export directory (config.json + safetensors), or 'parts'"
    if not (path / "config.json").is_file():
        raise MissingStartError(f"stage {stage.id} starts from {path}, which holds no HF export: {hint}")
    return InitSource("pretrained", path)


def part_of(name: str) -> str:
    """The top-level part a parameter name belongs to."""
    head = name.split(".", 1)[0]
    if head not in TRAINABLE_PARTS:
        raise ValueError(f"parameter {name!r} is outside {TRAINABLE_PARTS}")
    return head


def numel(p: nn.Parameter) -> int:
    """Full size of a parameter, also when ZeRO-3 has partitioned it (``ds_numel``)."""
    return int(getattr(p, "ds_numel", p.numel()))


def adapted_parts(stage: StageSchema) -> list[str]:
    """The parts holding the stage's adapters (none without adapters)."""
    if stage.adapter.kind == "none":
        return []
    return sorted({TARGET_PATTERNS[t].split("\\.", 1)[0] for t in stage.adapter.targets})


def apply_trainable(model: nn.Module, trainable: list[str]) -> dict[str, dict[str, int]]:
    """Freeze all, unfreeze ``trainable`` parts and every adapter tensor; returns
    ``{part: {"total", "trainable"}}`` counts (adapter tensors counted in their part)."""
    model.requires_grad_(False)
    for part in trainable:
        getattr(model, part).requires_grad_(True)
    for name, p in model.named_parameters():
        if is_adapter_param(name):
            p.requires_grad_(True)
    counts = {part: {"total": 0, "trainable": 0} for part in TRAINABLE_PARTS}
    for name, p in model.named_parameters():
        c = counts[part_of(name)]
        c["total"] += numel(p)
        c["trainable"] += numel(p) if p.requires_grad else 0
    return counts


def part_lr(stage: StageSchema, part: str) -> float:
    if part == "vision_tower" and stage.vision_lr is not None:
        return stage.vision_lr
    if part == "connector" and stage.connector_lr is not None:
        return stage.connector_lr
    return stage.lr


def _no_decay(name: str, p: nn.Parameter) -> bool:
    shape = getattr(p, "ds_shape", p.shape)
    return len(shape) < 2 or name.endswith(".bias") or "norm" in name.lower()


def param_groups(model: nn.Module, stage: StageSchema) -> list[dict]:
    """AdamW parameter groups: one per trainable part (split by weight decay when it is non-zero)."""
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = part_of(name)
        decay = stage.weight_decay > 0 and not _no_decay(name, p)
        key = (part, decay)
        if key not in groups:
            groups[key] = {
                "name": f"{part}" + ("" if stage.weight_decay == 0 else (".decay" if decay else ".no_decay")),
                "params": [],
                "lr": part_lr(stage, part),
                "weight_decay": stage.weight_decay if decay else 0.0,
            }
        groups[key]["params"].append(p)
    if not groups:
        raise ValueError(f"stage {stage.id}: no parameter requires grad (trainable={stage.trainable})")
    return list(groups.values())


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str = "cosine", min_ratio: float = 0.0):
    """Factor of the base LR for optimizer step ``s`` (0-based): ``(s+1)/W`` during the ``W`` warm-up
    steps, then cosine (or linear) from 1 to ``min_ratio`` over the remaining steps."""
    warm = warmup_steps(total_steps, warmup_ratio)
    decay_steps = max(1, total_steps - warm)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / decay_steps)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * shape

    return factor
