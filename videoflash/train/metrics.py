"""What a step reports, and where it goes (rank 0 only).

:class:`StepStats` accumulates one optimizer step on one rank (loss of every micro-batch, text and
visual tokens, samples, model FLOPs with the vision part on its own); :meth:`StepStats.reduce` sums
it over ranks. :class:`Reporter` turns it into the numbers users read — loss, lr, tokens/s (all ranks
and per device), visual tokens/s, s/step, ETA, TFLOP/s per device and MFU on GPU — and sends them to
a tqdm progress bar, ``metrics.jsonl`` and wandb.

Two MFUs, because papers report both: ``mfu`` counts every model FLOP of the step (vision tower,
connector, LLM); ``mfu_llm`` counts the LLM's alone over the same time, the convention of
lmms-engine's video figures ("vision FLOPs left out"). ``vision_flops_share`` says how far apart the
two are: the vision tower and connector's share of the step's FLOPs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import distributed

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    loss_sum: float = 0.0
    micro_batches: int = 0
    samples: int = 0
    text_tokens: int = 0
    visual_tokens: int = 0
    flops: float = 0.0
    vision_flops: float = 0.0  # of ``flops``: the vision tower and the connector

    def add(self, loss: float, batch: dict[str, Any], flops: float | dict[str, float]) -> None:
        """One micro-batch. ``flops``: the total, or :meth:`FlopsModel.batch`'s parts (``vision``,
        ``connector``, ``llm``, ``total``)."""
        if isinstance(flops, dict):
            self.vision_flops += flops.get("vision", 0.0) + flops.get("connector", 0.0)
            flops = flops["total"]
        self.loss_sum += loss
        self.micro_batches += 1
        self.samples += len(batch["keys"]) if "keys" in batch else int(batch["input_ids"].shape[0])  # packed rows hold several
        self.text_tokens += int(batch["num_text_tokens"].sum()) if "num_text_tokens" in batch else int(batch["attention_mask"].sum())
        self.visual_tokens += int(batch["num_visual_tokens"].sum()) if "num_visual_tokens" in batch else 0
        self.flops += flops

    def reduce(self, device: torch.device, replicas: int = 1) -> "StepStats":
        """Sums over all ranks (a collective). ``replicas``: ranks that saw the same batches (a
        sequence-parallel group, each holding the whole batch's loss and a share of its work), whose
        sums count once."""
        values = distributed.all_reduce_sum(
            [self.loss_sum, self.micro_batches, self.samples, self.text_tokens, self.visual_tokens, self.flops,
             self.vision_flops], device
        )
        values = [v / replicas for v in values]
        return StepStats(values[0], round(values[1]), round(values[2]), round(values[3]), round(values[4]), values[5],
                         values[6])

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.micro_batches)


@dataclass
class Reporter:
    """Rank-0 sinks. ``world_size`` and ``peak_tflops`` (per device, None on CPU) give MFU."""

    stage_dir: Path
    total_steps: int
    start_step: int
    world_size: int
    peak_tflops: float | None
    enabled: bool
    progress_bar: bool = True
    wandb_run: Any = None
    _bar: Any = field(default=None, repr=False)
    _file: Any = field(default=None, repr=False)
    _times: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        if not self.enabled:
            return
        path = self.stage_dir / "metrics.jsonl"
        if path.exists() and path.stat().st_size:  # a killed run may have left half a line
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            if torn:
                with open(path, "a") as f:
                    f.write("\n")
        self._file = open(path, "a")
        if self.progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total_steps, initial=self.start_step, desc=self.stage_dir.name,
                             unit="step", dynamic_ncols=True, smoothing=0.1)

    def step(self, step: int, stats: StepStats, seconds: float, lr: dict[str, float], extra: dict[str, Any]) -> dict:
        """Record optimizer step ``step`` (1-based) that took ``seconds``; returns the logged record."""
        tokens = stats.text_tokens + stats.visual_tokens
        self._times.append(seconds)
        recent = self._times[-20:]
        sec_per_step = sum(recent) / len(recent)
        record = {
            "step": step,
            "loss": stats.loss,
            **{f"lr/{k}": v for k, v in lr.items()},
            "samples": stats.samples,
            "tokens": tokens,
            "visual_tokens": stats.visual_tokens,
            "tokens_per_s": tokens / seconds,
            "tokens_per_s_per_device": tokens / seconds / self.world_size,
            "visual_tokens_per_s": stats.visual_tokens / seconds,
            "s_per_step": seconds,
            "eta_s": sec_per_step * (self.total_steps - step),
            "tflops_per_step": stats.flops / 1e12,
            "tflops_per_s_per_device": stats.flops / seconds / self.world_size / 1e12,
            "vision_tflops_per_s_per_device": stats.vision_flops / seconds / self.world_size / 1e12,
            "vision_flops_share": stats.vision_flops / stats.flops if stats.flops else 0.0,
            **extra,
        }
        if self.peak_tflops:
            record["mfu"] = record["tflops_per_s_per_device"] / self.peak_tflops
            llm = record["tflops_per_s_per_device"] - record["vision_tflops_per_s_per_device"]
            record["mfu_llm"] = llm / self.peak_tflops
        if not self.enabled:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=step)
        if self._bar is not None:
            first_lr = next(iter(lr.values())) if lr else math.nan
            postfix = {
                "loss": f"{stats.loss:.4f}",
                "lr": f"{first_lr:.2e}",
                "tok/s/dev": f"{record['tokens_per_s_per_device']:.0f}",
                "vis/s": f"{record['visual_tokens_per_s']:.0f}",
                "s/step": f"{seconds:.2f}",
                "TF/s/dev": f"{record['tflops_per_s_per_device']:.3g}",
                "vis-F": f"{record['vision_flops_share']:.0%}",
            }
            if "mfu" in record:
                postfix["mfu"] = f"{record['mfu']:.1%}"
                postfix["mfu-llm"] = f"{record['mfu_llm']:.1%}"
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(1)
        else:
            log.info("step %d/%d loss %.4f %.0f tok/s per device %.3g TFLOP/s per device (vision %.0f%%)%s "
                     "%.2f s/step eta %.0f s", step, self.total_steps, stats.loss, record["tokens_per_s_per_device"],
                     record["tflops_per_s_per_device"], 100 * record["vision_flops_share"],
                     f" MFU {record['mfu']:.1%} (LLM alone {record['mfu_llm']:.1%})" if "mfu" in record else "",
                     seconds, record["eta_s"])
        return record

    def event(self, **values) -> None:
        """A one-off record (checkpoint written, stage finished) in metrics.jsonl."""
        if self.enabled:
            self._file.write(json.dumps({"event": values.pop("event", "info"), "time": time.time(), **values}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb(logger_cfg, run_name: str, stage_dir: Path, config: dict[str, Any]):
    """wandb on rank 0 with the resolved config. The id derives from the name and the stage
    directory's absolute path: a resumed stage appends to its run, another run root gets its own."""
    import hashlib

    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    where = hashlib.sha1(str(stage_dir.resolve()).encode()).hexdigest()[:8]
    run_id = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in run_name) + f"-{where}"
    return wandb.init(
        project=logger_cfg.project,
        entity=logger_cfg.entity,
        name=run_name,
        id=run_id,
        resume="allow",
        dir=str(stage_dir),
        mode=logger_cfg.mode,
        tags=list(logger_cfg.tags),
        config=config,
    )
