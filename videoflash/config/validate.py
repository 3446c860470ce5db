"""Checks a composed config beyond what the schema's types can say.

Hydra already refused unknown keys and wrong types while composing (``schema.py``). This module
checks the values: choices, ranges, and facts that tie several fields together. It resolves every
interpolation, so a broken ``${...}`` fails here too. Each error names the key. Nothing here imports
torch: it runs before any heavy work.
"""

from __future__ import annotations

import re
import signal
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .schema import ADAPTER_TARGETS, FINETUNE_STAGE_ID, TRAINABLE_PARTS, VideoFlashSchema


class ConfigError(ValueError):
    """A config value that cannot work; ``key`` is its dotted path."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def _choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, choices))}")


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def resolve(cfg: DictConfig) -> VideoFlashSchema:
    """Resolve every interpolation and convert to the typed dataclasses (type errors name the key)."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(key, str(err).splitlines()[0]) from err


def _adapter(s) -> None:
    """The adapter settings, and what trains besides them."""
    a = s.adapter
    _choice("stage.adapter.kind", a.kind, ("none", "lora", "qlora"))
    _choice("stage.adapter.export", a.export, ("merge", "adapter"))
    if a.kind == "none":
        if not s.trainable:
            raise ConfigError("stage.trainable", "no part trains; list some of " + ", ".join(TRAINABLE_PARTS))
        return
    if not a.targets:
        raise ConfigError("stage.adapter.targets", "no module group; list some of " + ", ".join(ADAPTER_TARGETS))
    for target in a.targets:
        _choice("stage.adapter.targets", target, ADAPTER_TARGETS)
    _positive("stage.adapter.rank", a.rank)
    _positive("stage.adapter.alpha", a.alpha)
    if not 0.0 <= a.dropout < 1.0:
        raise ConfigError("stage.adapter.dropout", f"must be in [0, 1), got {a.dropout}")
    parts = {"llm_attention": "language_model", "llm_mlp": "language_model"}
    for target in a.targets:
        part = parts.get(target, target)
        if part in s.trainable:
            raise ConfigError("stage.adapter.targets", f"{target} adapts {part}, which stage.trainable trains in full")
    if a.kind == "qlora" and "language_model" in s.trainable:
        raise ConfigError("stage.trainable", "QLoRA holds the LLM in 4 bits: it cannot train in full")


def validate(cfg: DictConfig) -> VideoFlashSchema:
    """Validate a composed config; returns it resolved and typed, or raises :class:`ConfigError`."""
    c = resolve(cfg)
    s, m, d = c.stage, c.model, c.data

    # -- stage --------------------------------------------------------------------------------
    _choice("stage.id", s.id, (1, 2, 3, 4, FINETUNE_STAGE_ID))
    if s.id == FINETUNE_STAGE_ID and s.init in (None, "parts"):
        raise ConfigError("stage.init", "fine-tuning starts from an HF directory: a converted release or a stage export")
    _adapter(s)
    for part in s.trainable:
        _choice("stage.trainable", part, TRAINABLE_PARTS)
    if len(set(s.trainable)) != len(s.trainable):
        raise ConfigError("stage.trainable", f"repeated part in {s.trainable}")
    for key in ("lr", "vision_lr", "connector_lr", "adam_eps", "epochs"):
        _positive(f"stage.{key}", getattr(s, key))
    _positive("stage.weight_decay", s.weight_decay, allow_zero=True)
    _choice("stage.lr_schedule", s.lr_schedule, ("cosine", "linear", "constant"))
    if not 0.0 <= s.warmup_ratio < 1.0:
        raise ConfigError("stage.warmup_ratio", f"must be in [0, 1), got {s.warmup_ratio}")
    if not 0.0 <= s.min_lr_ratio <= 1.0:
        raise ConfigError("stage.min_lr_ratio", f"must be in [0, 1], got {s.min_lr_ratio}")
    if len(s.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in s.adam_betas):
        raise ConfigError("stage.adam_betas", f"two values in [0, 1), got {s.adam_betas}")
    _positive("stage.global_batch_size", s.global_batch_size)
    _positive("stage.micro_batch_size", s.micro_batch_size)
    if s.global_batch_size % s.micro_batch_size:
        raise ConfigError(
            "stage.global_batch_size",
            f"{s.global_batch_size} is not a multiple of stage.micro_batch_size={s.micro_batch_size}",
        )
    _positive("stage.max_steps", s.max_steps)
    if not re.fullmatch(r"middle|dynamic_fps1|fps:\d+(\.\d+)?", s.frames.sampling):
        raise ConfigError("stage.frames.sampling", f"{s.frames.sampling!r} is not one of middle, dynamic_fps1, fps:<rate>")
    fpc = m.vision.frames_per_clip
    for key in ("min_frames", "max_frames"):
        value = getattr(s.frames, key)
        if value <= 0 or value % fpc:
            raise ConfigError(f"stage.frames.{key}", f"must be a positive multiple of {fpc} (frames per clip), got {value}")
    if s.frames.min_frames > s.frames.max_frames:
        raise ConfigError("stage.frames.min_frames", f"{s.frames.min_frames} > stage.frames.max_frames={s.frames.max_frames}")
    _positive("stage.max_tokens", s.max_tokens)
    _choice("stage.image_mode", s.image_mode, ("square", "anyres"))
    _choice("stage.prompt_format", s.prompt_format, ("chatml", "plain"))
    for key, size in (("stage.image_size", s.image_size), ("model.image_size", m.image_size), ("model.hires_image_size", m.hires_image_size)):
        if size <= 0 or size % m.vision.patch_size:
            raise ConfigError(key, f"must be a positive multiple of model.vision.patch_size={m.vision.patch_size}, got {size}")

    # -- model ---------------------------------------------------------------------------------
    if m.vision.width % m.vision.num_heads:
        raise ConfigError("model.vision.width", f"{m.vision.width} is not divisible by num_heads={m.vision.num_heads}")
    if m.tokens_per_clip % fpc:
        raise ConfigError("model.tokens_per_clip", f"must be a multiple of frames_per_clip={fpc}")
    if m.text.pretrained is None:
        needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
        for key in needed:
            if getattr(m.text, key) is None:
                raise ConfigError(f"model.text.{key}", "needed to build a fresh LLM when model.text.pretrained is null")
    _positive("model.loss_chunk_size", m.loss_chunk_size)
    _positive("model.vision_clips_per_call", m.vision_clips_per_call, allow_zero=True)
    _choice("model.tokenizer.kind", m.tokenizer.kind, ("tiny", "pretrained"))
    if m.tokenizer.kind == "pretrained" and not (m.tokenizer.path or m.text.pretrained):
        raise ConfigError("model.tokenizer.path", "a pretrained tokenizer needs a path (or model.text.pretrained)")
    _choice("model.attn_implementation", m.attn_implementation,
            ("sdpa", "eager", "flash_attention_2", "flex_attention", "packed_varlen"))

    # -- data ------------------------------------------------------------------------------------
    if not d.sources:
        raise ConfigError("data.sources", "no training source")
    for i, src in enumerate(d.sources):
        _positive(f"data.sources[{i}].weight", src.weight)
    _positive("data.num_samples", d.num_samples)
    _positive("data.num_workers", d.num_workers, allow_zero=True)
    if d.synthetic is not None:
        _choice("data.synthetic.train_questions", d.synthetic.train_questions, ("one", "all"))
        scale = list(d.synthetic.shape_scale)
        if len(scale) != 2 or not 0 < float(scale[0]) <= float(scale[1]) <= 0.25:
            raise ConfigError("data.synthetic.shape_scale", f"must be [lo, hi] with 0 < lo <= hi <= 0.25, got {scale}")
        if not 0.0 <= float(d.synthetic.long_fraction) <= 1.0:
            raise ConfigError("data.synthetic.long_fraction", f"must be in [0, 1], got {d.synthetic.long_fraction}")
    _positive("data.max_batch_tokens", d.max_batch_tokens)
    _positive("data.pack_tokens", d.pack_tokens, allow_zero=True)
    if d.pack_tokens:
        if d.max_batch_tokens is not None:
            raise ConfigError("data.pack_tokens", "packing and data.max_batch_tokens exclude each other; set one")
        if d.pack_tokens < s.max_tokens:
            raise ConfigError("data.pack_tokens", f"{d.pack_tokens} < stage.max_tokens={s.max_tokens}: the longest "
                              "samples the stage admits would never fit a row")
        if s.max_steps is None:
            raise ConfigError("stage.max_steps", "with packing (data.pack_tokens) a row holds a varying number of "
                              "samples, so epochs do not give a step count: set the stage's optimizer steps")
    _choice("data.decode_isolation", d.decode_isolation, ("subprocess", "inline"))
    _positive("data.decode_timeout_s", d.decode_timeout_s)
    # the names of videoflash.model.video_io.BACKENDS (whether torchcodec loads is checked when the
    # loader is built: LoaderConfig.video_backend)
    _choice("data.video_backend", d.video_backend, ("auto", "torchcodec", "decord", "pyav"))

    # -- engine ----------------------------------------------------------------------------------
    ds = c.deepspeed
    _choice("deepspeed.zero_stage", ds.zero_stage, (0, 1, 2, 3))
    _choice("deepspeed.offload_optimizer", ds.offload_optimizer, ("none", "cpu"))
    _choice("deepspeed.offload_param", ds.offload_param, ("none", "cpu"))
    if ds.offload_param != "none" and ds.zero_stage != 3:
        raise ConfigError("deepspeed.offload_param", "parameter offload needs deepspeed.zero_stage=3")
    _choice("logger.kind", c.logger.kind, ("wandb", "none"))
    _choice("logger.mode", c.logger.mode, ("online", "offline", "disabled"))
    _choice("launcher.kind", c.launcher.kind, ("local", "slurm"))
    _choice("launcher.backend", c.launcher.backend, ("auto", "nccl", "gloo"))
    _positive("launcher.nproc_per_node", c.launcher.nproc_per_node)
    _positive("launcher.dist_timeout_min", c.launcher.dist_timeout_min)
    for name in c.launcher.preempt_signals:
        if not isinstance(getattr(signal, name, None), signal.Signals):
            raise ConfigError("launcher.preempt_signals", f"{name!r} is not a signal name")
    t = c.train
    _choice("train.precision", t.precision, ("auto", "bf16", "fp32"))
    _choice("train.export_dtype", t.export_dtype, ("bf16", "fp16", "fp32"))
    _positive("train.log_every", t.log_every)
    _positive("train.checkpoint_every", t.checkpoint_every, allow_zero=True)
    _positive("train.keep_checkpoints", t.keep_checkpoints)
    _positive("train.stop_after_steps", t.stop_after_steps)
    _positive("train.grad_clip", t.grad_clip, allow_zero=True)
    _positive("train.sequence_parallel", t.sequence_parallel)
    if t.sequence_parallel > 1:
        if d.pack_tokens:
            raise ConfigError("train.sequence_parallel", "sequence parallelism splits one long sample over ranks; "
                              "packing (data.pack_tokens) fills rows with short ones: set one of them")
        if m.attn_implementation == "eager":
            raise ConfigError("train.sequence_parallel", "Ulysses wraps a registered attention function: "
                              "set model.attn_implementation to sdpa or flash_attention_2, not eager")
        if m.text.pretrained is None:  # a pretrained LLM's heads are checked when it loads
            heads, kv = m.text.num_attention_heads, m.text.num_key_value_heads
            if heads % t.sequence_parallel or kv % t.sequence_parallel:
                raise ConfigError("train.sequence_parallel", f"{t.sequence_parallel} must divide the LLM's attention "
                                  f"heads and key-value heads (model.text.num_attention_heads={heads}, "
                                  f"num_key_value_heads={kv})")
    _positive("eval.max_samples", c.eval.max_samples)
    _positive("eval.max_new_tokens", c.eval.max_new_tokens)
    _positive("eval.batch_size", c.eval.batch_size)
    if not c.resume:
        raise ConfigError("resume", "empty; use auto, never or a checkpoint directory")
    if not c.name or "/" in c.name:
        raise ConfigError("name", f"{c.name!r} must be a non-empty name without '/'")
    return c
