"""One stage of training on DeepSpeed: setup, the step loop, checkpoints, the stage-end export.

``run(cfg)`` is what ``python -m videoflash.train`` calls after the config validated. Setup order
matters under ZeRO-3:

1. process group (torchrun / srun / one process), run directories (rank 0 creates and writes);
2. the DeepSpeed config rendered from typed fields, saved as ``ds_config.json``;
3. the model: stage 1 from parts -- rank 0 builds LLM + UMT + new connector on CPU and writes an
   ``init`` HF export -- then every rank loads its starting point with ``from_pretrained`` under a
   live ``HfDeepSpeedConfig``, so ``zero.Init`` partitions it while it loads;
4. adapters (``stage.adapter``: peft LoRA layers injected in place, :mod:`adapters`) after the
   load and before DeepSpeed, freezing, per-module AdamW groups (only parameters that train),
   cosine schedule with warm-up, ``deepspeed.initialize``; the data loader; resume from the latest
   checkpoint (adapter tensors are module parameters: checkpointed and restored with the rest).

:meth:`Trainer.fit` is the step loop.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Before torch/DeepSpeed are imported: a CPU-only machine runs DeepSpeed's CPU accelerator (gloo),
# and the op DeepSpeed compiles there at start-up is cached between runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/videoflash/torch_extensions"))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from omegaconf import DictConfig, OmegaConf  # noqa: E402

from videoflash.config import ConfigError  # noqa: E402
from videoflash.config.schema import FINETUNE_STAGE_ID, VideoFlashSchema  # noqa: E402
from videoflash.data.collate import PACKED_BATCH_KEYS  # noqa: E402

from . import adapters, distributed, ds_config, stages  # noqa: E402
from . import sequence_parallel as seqpar  # noqa: E402
from .checkpoint import (  # noqa: E402
    CheckpointError,
    CheckpointManager,
    CheckpointWriteError,
    rng_state,
    set_rng_state,
    verify,
)
from .data import MissingDataError, check_sources  # noqa: E402
from .flops import FlopsModel, peak_tflops  # noqa: E402
from .metrics import Reporter, StepStats, start_wandb  # noqa: E402
from .preemption import EXIT_PREEMPTED, Preemption  # noqa: E402

log = logging.getLogger("videoflash.train")

#: Exit status when the stage cannot start (its starting point or its data is missing), as for
#: config errors.
EXIT_CONFIG_ERROR = 2
#: Exit status when a checkpoint could not be written (full disk): training stops, the previous
#: checkpoint is intact.
EXIT_CHECKPOINT_FAILED = 1

MODEL_KEYS = PACKED_BATCH_KEYS[:9]  # the batch keys that the model's forward takes (docs/contracts.md)


@dataclass
class TrainerState:
    """What a checkpoint records besides DeepSpeed's files (``trainer_state.json``)."""

    stage: int
    step: int = 0
    samples_seen: int = 0
    text_tokens_seen: int = 0
    visual_tokens_seen: int = 0
    elapsed_s: float = 0.0  # training time over all attempts of this stage


def _setup_logging(rank: int, stage_dir: Path) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        handlers.append(logging.FileHandler(stage_dir / "train.log"))
    fmt = logging.Formatter("[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    root = logging.getLogger("videoflash")
    root.handlers.clear()
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


class Trainer:
    def __init__(self, cfg: VideoFlashSchema, raw_cfg: DictConfig):
        self.cfg = cfg
        self.raw_cfg = raw_cfg
        stage = cfg.stage
        if cfg.train.cpu_threads:
            torch.set_num_threads(cfg.train.cpu_threads)
        self.dist = distributed.detect()
        self.device = distributed.init(self.dist, cfg.launcher.backend, cfg.launcher.dist_timeout_min)
        self.rank, self.world = self.dist.rank, self.dist.world_size
        self.is_main = self.rank == 0
        self.stage_dir = stages.stage_dir(cfg.run_root, stage.id)
        if self.is_main:
            self.stage_dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        _setup_logging(self.rank, self.stage_dir)
        self.preemption = Preemption(cfg.launcher.preempt_signals, self.device, cfg.launcher.requeue, self.rank)
        self.ckpt = CheckpointManager(self.stage_dir / "checkpoints", cfg.train.keep_checkpoints, self.rank, self.world,
                                      trust_pickle=cfg.train.trust_checkpoint_pickle)
        self.export_dir = stages.export_dir(cfg.run_root, stage.id)
        self.bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and self.device.type == "cuda")
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.reporter: Reporter | None = None
        self.engine = None
        self.resumed_from: str | None = None
        self.lora_config = None  # peft's LoraConfig when the stage trains adapters
        # sequence parallelism: SP groups of consecutive ranks read the same samples; the loader and
        # the batch arithmetic go by the data-parallel ranks (checked in setup)
        self.sp = cfg.train.sequence_parallel
        self.dp_rank = seqpar.data_parallel_rank(self.rank, self.sp)
        self.dp_world: int | None = None  # world / sp, checked in setup
        self.mpu = None  # DeepSpeed's sequence-parallel groups, for deepspeed.initialize
        self.backward_scale = seqpar.backward_scale(cfg.deepspeed.zero_stage, self.sp)

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------
    def finished_before(self) -> bool:
        """A stage whose export is complete is not trained again under ``resume=auto``."""
        info = self.export_dir / "training_state.json"
        return self.cfg.resume == "auto" and info.is_file() and json.loads(info.read_text()).get("completed", False)

    def setup(self) -> None:
        cfg, stage = self.cfg, self.cfg.stage
        if cfg.resume == "never" and self.is_main:
            for old in (self.stage_dir / "checkpoints", self.export_dir):
                if old.exists():
                    log.warning("resume=never: removing %s", old)
                    shutil.rmtree(old)
        distributed.barrier()
        self.init = stages.init_source(stage, cfg.run_root)
        check_sources(cfg)
        self.resume_path = self.find_resume_path()  # checked before any model is built
        self.dp_world = seqpar.data_parallel_size(self.world, self.sp)
        log.info("stage %d (%s) on %d rank(s)%s, %s, %s; starts from %s", stage.id, stage.name, self.world,
                 f" ({self.dp_world} data-parallel x {self.sp} sequence-parallel)" if self.sp > 1 else "",
                 self.device.type, "bf16" if self.bf16 else "fp32",
                 "parts" if self.init.kind == "parts" else self.init.path)
        if self.is_main:
            (self.stage_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.raw_cfg, resolve=True))

        self.ds_config = ds_config.render(
            cfg.deepspeed, global_batch=stage.global_batch_size, micro_batch=stage.micro_batch_size,
            world_size=self.dp_world, bf16=self.bf16, grad_clip=cfg.train.grad_clip, sequence_parallel=self.sp,
        )
        self.grad_accum = self.ds_config["gradient_accumulation_steps"]
        if self.is_main:
            (self.stage_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
            log.info("DeepSpeed config: %s", json.dumps(self.ds_config))

        self.model, self.tokenizer = self.build_model()
        counts = stages.apply_trainable(self.model, stage.trainable)
        for part, c in counts.items():
            log.info("  %-15s %12d parameters, %12d train", part, c["total"], c["trainable"])
        if self.lora_config is not None:
            n = sum(stages.numel(p) for name, p in self.model.named_parameters() if adapters.is_adapter_param(name))
            log.info("  %s adapters (rank %d, alpha %g) on %s: %d parameters", stage.adapter.kind, stage.adapter.rank,
                     stage.adapter.alpha, ", ".join(stage.adapter.targets), n)
        if cfg.train.activation_checkpointing:
            self.model.activation_checkpointing_enable({"use_reentrant": False})
        self.flops = FlopsModel.from_config(self.model.config, sorted({*stage.trainable, *stages.adapted_parts(stage)}))

        if cfg.data.pack_tokens and self.device.type == "cuda" and cfg.model.attn_implementation == "eager":
            log.warning("packing with eager attention builds a dense block-diagonal mask over each micro-batch; "
                        "model.attn_implementation=sdpa (packed_varlen: flash-attn, torch's varlen or FlexAttention "
                        "for packed rows) does without it")
        self.loader = self.build_loader()
        self.total_steps = self.count_steps()
        optimizer = self.build_optimizer()
        factor = stages.lr_lambda(self.total_steps, stage.warmup_ratio, stage.lr_schedule, stage.min_lr_ratio)
        import deepspeed

        if self.resume_path is not None and self.ckpt.written_by(self.resume_path) != self.world:
            self.ckpt.prepare_universal(self.resume_path)  # resuming on another number of ranks
            self.ds_config["checkpoint"] = {"load_universal": True}
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, config=self.ds_config, mpu=self.mpu,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
        )
        self.engine.train()
        self.state = TrainerState(stage=stage.id)
        self.resume()
        self.batches = iter(self.loader)
        self.start_reporting()

    def build_tokenizer(self):
        from videoflash.data.tokenizer import build_chatml_tokenizer, ensure_image_token

        tok_cfg = self.cfg.model.tokenizer
        if tok_cfg.kind == "tiny":
            tokenizer = build_chatml_tokenizer()
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tok_cfg.path or self.cfg.model.text.pretrained)
        ensure_image_token(tokenizer)
        return tokenizer

    def parts_export(self) -> Path:
        """Stage 1's starting point written once by rank 0: LLM + UMT weights + a new connector."""
        m, stage = self.cfg.model, self.cfg.stage
        init_dir = self.stage_dir / "init"
        if self.is_main and not (init_dir / "config.json").is_file():
            from videoflash.model.modeling_videoflash import VideoFlashForConditionalGeneration

            tokenizer = self.build_tokenizer()
            text: Any = m.text.pretrained
            if text is None:
                fields = {k: v for k, v in asdict(m.text).items() if k != "pretrained" and v is not None}
                text = dict(fields, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
            vision = {k: v for k, v in asdict(m.vision).items() if k not in ("pretrained", "trust_pickle")}
            vision["image_size"] = stage.image_size
            torch.manual_seed(self.cfg.seed)
            model = VideoFlashForConditionalGeneration.from_parts(
                text=text, vision=m.vision.pretrained, vision_config=vision, tokenizer=tokenizer,
                vision_trust_pickle=m.vision.trust_pickle,
                tokens_per_clip=m.tokens_per_clip, tokens_per_image=m.tokens_per_image, max_grid=m.max_grid,
                **self.dropout_fields(), **self.memory_fields(),
            )
            tmp = init_dir.with_name(".tmp_init")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, init_dir)
            log.info("stage-1 starting point (from parts) written to %s", init_dir)
            del model
        distributed.barrier()
        return init_dir

    def dropout_fields(self) -> dict[str, Any]:
        m = self.cfg.model
        return dict(
            visual_dropout_layers=list(m.visual_dropout_layers),
            visual_dropout_keep_ratios=list(m.visual_dropout_keep_ratios),
            visual_dropout_kinds=list(m.visual_dropout_kinds) or None,
            visual_dropout_in_training=m.visual_dropout_in_training,
        )

    def memory_fields(self) -> dict[str, int]:
        """The model config's memory bounds of training (``model.loss_chunk_size``,
        ``model.vision_clips_per_call``): the run's config wins over the starting point's."""
        m = self.cfg.model
        return dict(loss_chunk_size=m.loss_chunk_size, vision_clips_per_call=m.vision_clips_per_call)

    def build_model(self):
        """Every rank loads the starting point with ``from_pretrained`` while ``HfDeepSpeedConfig`` is
        alive, so ZeRO-3 partitions the parameters as they load (never ``load_state_dict``)."""
        from transformers import AutoTokenizer
        from transformers.integrations import HfDeepSpeedConfig

        from videoflash.model.configuration_videoflash import VideoFlashConfig
        from videoflash.model.modeling_videoflash import VideoFlashForConditionalGeneration

        path = self.parts_export() if self.init.kind == "parts" else self.init.path
        config = VideoFlashConfig.from_pretrained(path)
        if self.cfg.stage.id == FINETUNE_STAGE_ID and config.image_size != self.cfg.stage.image_size:
            log.warning("the starting point runs at %d px, stage.image_size is %d: fine-tuning at %d px "
                        "(set stage.image_size=%d to keep the model's resolution)", config.image_size,
                        self.cfg.stage.image_size, self.cfg.stage.image_size, config.image_size)
        config.vision_config["image_size"] = self.cfg.stage.image_size  # stage 4: high resolution
        for key, value in {**self.dropout_fields(), **self.memory_fields()}.items():
            if value is not None:
                setattr(config, key, value)
        config.validate_visual_dropout()
        adapter = self.cfg.stage.adapter
        extra = {}
        if adapter.kind == "qlora":
            extra["quantization_config"] = adapters.quantization_config(self.device, self.dtype)
        self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)  # must stay alive (weakref in transformers)
        attn = self.cfg.model.attn_implementation
        if self.cfg.data.pack_tokens and attn == "sdpa":
            # SDPA for every unpacked call; packed rows by varlen kernels (CUDA) or sample by sample
            from videoflash.model.packing import VARLEN as attn
        model = VideoFlashForConditionalGeneration.from_pretrained(
            path, config=config, dtype=self.dtype, attn_implementation=attn, **extra
        )
        if self.sp > 1:  # DeepSpeed-Ulysses in the LLM's attention, the model's split/gather hooks
            seqpar.check_heads(model.config.text_config, self.sp)
            self.mpu = seqpar.initialize(self.sp)
            core = model.language_model.config._attn_implementation
            sp = seqpar.install(model, self.mpu.get_sequence_parallel_group(), core)
            log.info("sequence parallel over %d ranks: Ulysses all-to-all around %s attention", sp.size, core)
        if adapter.kind != "none":  # before deepspeed.initialize, which partitions the new tensors too
            self.lora_config = adapters.add_adapters(model, adapter, self.cfg.seed)
        tokenizer = AutoTokenizer.from_pretrained(path, config=config)
        return model, tokenizer

    def build_optimizer(self):
        stage = self.cfg.stage
        groups = stages.param_groups(self.model, stage)
        for g in groups:
            log.info("  optimizer group %-16s lr %.2e  %d tensors", g["name"], g["lr"], len(g["params"]))
        kwargs = dict(lr=stage.lr, betas=tuple(stage.adam_betas), eps=stage.adam_eps, weight_decay=0.0)
        if self.cfg.deepspeed.offload_optimizer != "none":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        return torch.optim.AdamW(groups, **kwargs)

    def build_loader(self):
        from .data import build_train_loader

        # the ranks of one sequence-parallel group read the same samples
        loader, self.epoch_samples = build_train_loader(self.cfg, self.tokenizer, self.model.config, self.dp_rank,
                                                        self.dp_world)
        return loader

    def count_steps(self) -> int:
        """``stage.max_steps``, or the optimizer steps of ``stage.epochs`` passes over the mix."""
        stage = self.cfg.stage
        if stage.max_steps is not None:
            return stage.max_steps
        return max(1, math.ceil(stage.epochs * self.epoch_samples / stage.global_batch_size))

    def find_resume_path(self) -> Path | None:
        """The checkpoint to continue from (``resume=auto``: the latest intact one; a path, which
        must be intact; ``never``), found by rank 0 and agreed by all ranks; :class:`ConfigError`
        (key ``resume``) on every rank when it cannot be used."""
        cfg = self.cfg
        path, problem = None, None
        if self.is_main and cfg.resume == "auto":
            try:
                path = self.ckpt.latest()
            except CheckpointError as err:
                problem = f"auto: {err}"
        elif self.is_main and cfg.resume != "never":
            path = Path(cfg.resume)
            if problems := verify(path):
                problem = f"{path} is not an intact checkpoint: {'; '.join(problems)}"
        path, problem = distributed.broadcast_object((path, problem))
        if problem:
            raise ConfigError("resume", problem)
        return path

    def resume(self) -> None:
        cfg = self.cfg
        path = self.resume_path
        if path is None:
            log.info("starting stage %d at step 0 of %d", cfg.stage.id, self.total_steps)
            return
        state, rank_state = self.ckpt.load(self.engine, path)
        self.resumed_from = str(path)
        known = {k: v for k, v in state.items() if k in TrainerState.__dataclass_fields__}
        self.state = TrainerState(**known)
        # this rank's own loader state; after a change of world size (the checkpoint gives the list) or
        # of data.num_workers, every old rank's, from which the loader deals out the rest of the epoch
        from videoflash.data.pipeline import OlderLoaderState

        loader_state = rank_state["loader"]
        if isinstance(loader_state, dict) and (not self.loader.same_layout(loader_state)
                                               or loader_state.get("rank") != self.dp_rank):
            # the ranks of a sequence-parallel group saved the same loader state: one per loader rank
            per_loader_rank: dict[int, Any] = {}
            for st in self.ckpt.loader_states(path):
                per_loader_rank.setdefault(int(st["rank"]), st)
            loader_state = list(per_loader_rank.values())
        try:
            self.loader.load_state_dict(loader_state)
        except OlderLoaderState as exn:
            log.warning("%s: %s; the data stream starts its epoch again", path, exn)
        set_rng_state(rank_state["rng"])
        log.info("resumed from %s at step %d of %d", path, self.state.step, self.total_steps)

    def start_reporting(self) -> None:
        cfg = self.cfg
        peak = cfg.train.peak_tflops
        if peak is None and self.device.type == "cuda":
            peak = peak_tflops(torch.cuda.get_device_name(self.device))
        wandb_run = None
        if self.is_main and cfg.logger.kind == "wandb":
            name = f"{cfg.name}-stage{cfg.stage.id}"
            wandb_run = start_wandb(cfg.logger, name, self.stage_dir, OmegaConf.to_container(self.raw_cfg, resolve=True))
        self.reporter = Reporter(
            stage_dir=self.stage_dir, total_steps=self.total_steps, start_step=self.state.step,
            world_size=self.world, peak_tflops=peak, enabled=self.is_main,
            progress_bar=cfg.train.progress_bar, wandb_run=wandb_run,
        )
        self.reporter.event(event="start", step=self.state.step, total_steps=self.total_steps, world_size=self.world,
                            resumed_from=self.resumed_from)

    # ------------------------------------------------------------------------------------------
    # the step loop
    # ------------------------------------------------------------------------------------------
    def fit(self) -> int:
        """Forward, backward, step, log -- until the stage's last step, a signal or ``stop_after``."""
        engine, state, every = self.engine, self.state, self.cfg.train.checkpoint_every
        while state.step < self.total_steps:
            start = time.perf_counter()
            lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
            stats = StepStats()
            for _ in range(self.grad_accum):
                batch = self.next_batch()
                inputs = self.model_inputs(batch)
                calls = self.vision_calls(batch)
                if calls is not None:
                    inputs["vision_calls"] = calls
                loss = engine(**inputs).loss
                engine.backward(loss * self.backward_scale if self.backward_scale != 1 else loss)
                engine.step()  # DeepSpeed steps the optimizer and the LR schedule every grad_accum calls
                stats.add(loss.item(), batch, self.flops.batch(batch))
            self.after_step(stats, time.perf_counter() - start, lrs)
            stop = self.preemption.should_stop() or state.step == self.cfg.train.stop_after_steps
            if stop or (every and state.step % every == 0):
                self.save_checkpoint()
            if stop:
                return self.stop_early()
        self.export()
        return 0

    def next_batch(self) -> dict[str, Any]:
        try:
            return next(self.batches)
        except StopIteration:  # an epoch of the stream ended: the loader starts its next one
            self.batches = iter(self.loader)
            return next(self.batches)

    def vision_calls(self, batch: dict[str, Any]) -> int | None:
        """With ``model.vision_clips_per_call`` set, the encoder calls of this micro-batch agreed by
        every rank: the largest number any rank's micro-batch needs (an all-reduce MAX, one per
        micro-batch). Under ZeRO-3 every rank must call each module as often as the others (each call
        gathers its parameters collectively), so a rank with fewer clips pads with dummy calls; the
        all-reduce spans the whole world, since ZeRO-3 partitions over every rank (the ranks of a
        sequence-parallel group read the same samples, and agree trivially). None: one call per
        micro-batch, nothing to agree."""
        if not self.model.config.vision_clips_per_call:
            return None
        counts = batch.get("video_frame_counts")
        frames = int(counts.sum()) if counts is not None else 0
        needed = self.model.vision_calls_needed(frames)
        return int(distributed.all_reduce_max(needed, self.device)) if self.world > 1 else needed

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {k: batch[k].to(self.device, non_blocking=True) for k in MODEL_KEYS if k in batch}

    def after_step(self, stats: StepStats, seconds: float, lrs: dict[str, float]) -> None:
        total = stats.reduce(self.device, replicas=self.sp)
        s = self.state
        s.step += 1
        s.samples_seen += total.samples
        s.text_tokens_seen += total.text_tokens
        s.visual_tokens_seen += total.visual_tokens
        s.elapsed_s += seconds
        if s.step % self.cfg.train.log_every == 0 or s.step == self.total_steps:
            self.reporter.step(s.step, total, seconds, lrs, {"tokens_seen": s.text_tokens_seen + s.visual_tokens_seen})

    # ------------------------------------------------------------------------------------------
    # checkpoints, preemption, export
    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        rank_state = {"loader": self.loader.state_dict(), "rng": rng_state()}
        path = self.ckpt.save(self.engine, self.state.step, asdict(self.state), rank_state)
        self.reporter.event(event="checkpoint", step=self.state.step, path=str(path))

    def stop_early(self) -> int:
        requeued = self.preemption.requeue()
        log.warning("stopped after step %d with a checkpoint%s; continue with resume=auto (exit %d)",
                    self.state.step, " (job requeued)" if requeued else "", EXIT_PREEMPTED)
        self.reporter.event(event="preempted", step=self.state.step, requeued=requeued)
        return EXIT_PREEMPTED

    def export(self) -> None:
        from .export import export_hf

        info = dict(asdict(self.state), completed=True, total_steps=self.total_steps, name=self.cfg.name,
                    init=str(self.init.path) if self.init.path else "parts", trainable=list(self.cfg.stage.trainable))
        adapter = self.cfg.stage.adapter
        if self.lora_config is not None:
            info["adapter"] = dict(kind=adapter.kind, rank=adapter.rank, alpha=adapter.alpha, targets=list(adapter.targets),
                                   export=adapter.export)
        init = self.init.path
        export_hf(self.engine, self.tokenizer, self.export_dir, self.cfg.train.export_dtype, info,
                  lora=self.lora_config, adapter_export=adapter.export,
                  base_dir=init if adapter.kind == "qlora" else None,
                  carry=[init / "processor_config.json"] if init is not None else [])
        self.reporter.event(event="export", step=self.state.step, path=str(self.export_dir))
        log.info("stage %d done: %d steps, export in %s", self.cfg.stage.id, self.state.step, self.export_dir)

    def close(self) -> None:
        if self.reporter is not None:
            self.reporter.close()
        self.preemption.restore()


def run(cfg: DictConfig, typed: VideoFlashSchema, argv: list[str]) -> int:
    """Train one stage; returns the process exit status (0, or 75 after a preemption checkpoint)."""
    distributed.maybe_relaunch(typed.launcher.nproc_per_node, argv)
    trainer = Trainer(typed, cfg)
    try:
        if trainer.finished_before():
            log.info("stage %d already finished (%s); nothing to do", typed.stage.id, trainer.export_dir)
            return 0
        try:
            trainer.setup()
        except (stages.MissingStartError, MissingDataError, adapters.AdapterError) as err:
            log.error("%s", err)
            return EXIT_CONFIG_ERROR
        except ConfigError as err:
            log.error("config error: %s", err)
            return EXIT_CONFIG_ERROR
        except CheckpointError as err:  # a checkpoint that verified but holds more than data
            log.error("checkpoint error: %s", err)
            return EXIT_CONFIG_ERROR
        try:
            return trainer.fit()
        except CheckpointWriteError as err:
            log.error("checkpoint not written: %s", err)
            return EXIT_CHECKPOINT_FAILED
    finally:
        trainer.close()
        distributed.shutdown()
