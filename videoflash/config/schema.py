"""The typed schema of a videoflash run.

Every YAML file under ``configs/`` is merged into these dataclasses (registered in Hydra's
ConfigStore as ``videoflash_schema``, the first entry of ``configs/train.yaml``'s defaults list), so
Hydra itself rejects an unknown key or a value of the wrong type while composing, and names the key
(``stage.lrr``, ``stage.lr=abc``). ``videoflash.config.validate`` adds the checks that need more than
one field (trainable parts, batch divisibility, ...). Nothing here imports torch, DeepSpeed or the
model: a bad config fails in about a second.

The schema lives in this importable module and never in an entry point: Hydra launchers that pickle
the config (submitit) lose dataclass defaults of classes defined in ``__main__``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

TRAINABLE_PARTS = ("vision_tower", "connector", "language_model")
#: module groups a LoRA adapter may target (videoflash.train.adapters maps them to module names)
ADAPTER_TARGETS = ("llm_attention", "llm_mlp", "connector", "vision_tower")
#: the fine-tuning stage (``stage=finetune``): after the four of the curriculum, from any export
FINETUNE_STAGE_ID = 5


# --------------------------------------------------------------------------------------------------
# model/
# --------------------------------------------------------------------------------------------------
@dataclass
class VisionSchema:
    """The UMT clip encoder (``VideoFlashConfig.vision_config``)."""

    width: int = 1024
    depth: int = 23  # blocks built and run (UMT-L: 23 of the 24 released, select layer -2)
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 16
    frames_per_clip: int = 4
    norm_eps: float = 1e-6
    final_norm_eps: float = 1e-12
    # Official UMT weights (``UMT-L_f4_vision.pt``) for stage 1; null = a freshly initialised encoder.
    pretrained: Optional[str] = None
    # The file is loaded as data (tensors, plain containers, argparse.Namespace); true unpickles it
    # without restriction, which runs any code it holds: only for a file you trust.
    trust_pickle: bool = False


@dataclass
class TextSchema:
    """The LLM. ``pretrained`` (an HF directory or hub id) wins; otherwise a fresh Qwen2 is built
    from the fields below (the tiny CPU model). The fields stay null for pretrained presets."""

    pretrained: Optional[str] = None
    model_type: str = "qwen2"
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_hidden_layers: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    rope_theta: Optional[float] = None
    tie_word_embeddings: Optional[bool] = None


@dataclass
class TokenizerSchema:
    """``tiny``: the small ChatML tokenizer of ``videoflash.data.tokenizer`` (CPU model);
    ``pretrained``: the LLM's own tokenizer (``path``, or ``model.text.pretrained`` when null)."""

    kind: str = "tiny"
    path: Optional[str] = None


@dataclass
class ModelSchema:
    name: str = MISSING
    image_size: int = 224  # stages 1-3
    hires_image_size: int = 448  # stage 4 (high-resolution post-finetuning)
    tokens_per_clip: int = 64
    tokens_per_image: int = 64
    max_grid: int = 6
    attn_implementation: str = "sdpa"
    visual_dropout_layers: List[int] = field(default_factory=list)
    visual_dropout_keep_ratios: List[float] = field(default_factory=list)
    visual_dropout_kinds: List[str] = field(default_factory=list)
    visual_dropout_in_training: bool = False
    # Memory bounds of training (docs/scale.md, "Memory-bounded loss and vision"). The loss runs the
    # output head over the supervised positions only, this many rows of [rows, vocabulary] logits at
    # a time (never [tokens, vocabulary]; Liger's fused kernel on CUDA when installed ignores it).
    loss_chunk_size: int = 4096
    # Clips per vision-tower call in training, each call activation-checkpointed (memory bounded by
    # one call's clips); 0 = every clip of a micro-batch in one call. The ranks agree on a common
    # number of calls per step (ZeRO-3 needs the same module calls on every rank).
    vision_clips_per_call: int = 0
    vision: VisionSchema = field(default_factory=VisionSchema)
    text: TextSchema = field(default_factory=TextSchema)
    tokenizer: TokenizerSchema = field(default_factory=TokenizerSchema)


# --------------------------------------------------------------------------------------------------
# data/
# --------------------------------------------------------------------------------------------------
@dataclass
class SourceSchema:
    """One source of a mix: WebDataset shards (a brace pattern) and its sampling weight."""

    name: str = MISSING
    shards: str = MISSING
    weight: float = 1.0


@dataclass
class SynthSchema:
    """How ``make quickstart`` generates the synthetic corpus (``data_tools.synth_videos``)."""

    num_train: int = 2000
    num_heldout: int = 200
    seed: int = 0
    train_questions: str = "one"  # "all": training records ask every fact their video shows (multi-turn)
    # the shapes' half-size as a fraction of the frame's shorter side, drawn per video in [lo, hi]
    shape_scale: list = field(default_factory=lambda: [0.17, 0.17])
    long_fraction: float = 0.125  # share of long needle videos in each split


@dataclass
class DataSchema:
    name: str = MISSING
    root: str = MISSING  # where the corpus (annotations, media, shards) lives
    sources: List[SourceSchema] = field(default_factory=list)
    heldout: Optional[str] = None  # held-out annotations with known answers (synthetic corpus)
    num_samples: Optional[int] = None  # samples in one epoch of the mix (the loader's samples_per_epoch); null = read the shard index
    num_workers: int = 2
    shuffle_buffer: int = 1000  # samples per shuffle window of the loader (rounded up to whole units)
    # null: a fixed number of samples per micro-batch (stage.micro_batch_size); otherwise a
    # micro-batch holds at most micro_batch_size samples, padded to its longest, with
    # samples x longest <= this many tokens (text + visual): it only shrinks batches, it does not pack
    max_batch_tokens: Optional[int] = None
    # null or 0: padded micro-batches. Otherwise PACKING: samples end to end in rows of at most
    # this many tokens (text + visual; >= stage.max_tokens), each sample with its own positions,
    # attention and visual dropout; stage.micro_batch_size and stage.global_batch_size then count
    # rows, and stage.max_steps sets the stage's length (docs/data.md, "Packing")
    pack_tokens: Optional[int] = None
    # videos decode in a child process per loader stream, so that a file that crashes or hangs the
    # native decoder costs one sample (docs/data.md, "Decoder isolation"); "inline" opts out
    decode_isolation: str = "subprocess"
    decode_timeout_s: float = 120.0
    # the video decoder: auto (torchcodec when it loads its FFmpeg libraries, else decord) |
    # torchcodec | decord | pyav; all pick the same frames (docs/data.md, "Decoding")
    video_backend: str = "auto"
    synthetic: Optional[SynthSchema] = None


# --------------------------------------------------------------------------------------------------
# stage/
# --------------------------------------------------------------------------------------------------
@dataclass
class FramesSchema:
    """Frame sampling of a stage (videochat_flash.md §3): ``middle`` = exactly ``max_frames``
    uniformly; ``dynamic_fps1`` = about 1 fps, a multiple of 4, clamped to [min, max];
    ``fps:<rate>`` = the same rule at another rate."""

    sampling: str = "dynamic_fps1"
    min_frames: int = 4
    max_frames: int = 8


@dataclass
class AdapterSchema:
    """Low-rank adapters (peft LoRA) trained instead of the weights they adapt.

    ``kind``: ``none`` (the parts of ``stage.trainable`` train in full), ``lora``, or ``qlora`` (the
    LLM's linear layers held in 4 bits by bitsandbytes, CUDA only). ``targets`` picks the module
    groups of :data:`ADAPTER_TARGETS`; a group's part must not also be in ``stage.trainable``.
    ``export``: ``merge`` folds the adapters into the exported weights (a plain checkpoint);
    ``adapter`` exports the base weights and ships the adapter beside them (``adapter/``, peft's
    format)."""

    kind: str = "none"  # none | lora | qlora
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: List[str] = field(default_factory=lambda: ["llm_attention", "llm_mlp"])
    export: str = "merge"  # merge | adapter


@dataclass
class StageSchema:
    id: int = MISSING  # 1..4, 5 = finetune; typed on the command line as ``stage=3`` / ``stage=finetune``
    name: str = MISSING
    trainable: List[str] = field(default_factory=list)  # subset of TRAINABLE_PARTS
    lr: float = MISSING  # connector and LLM
    vision_lr: Optional[float] = None  # null = lr
    connector_lr: Optional[float] = None  # null = lr
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    global_batch_size: int = MISSING  # samples per optimizer step, all ranks together
    micro_batch_size: int = 1  # samples per forward on one rank
    epochs: float = 1.0
    max_steps: Optional[int] = None  # null = epochs * data.num_samples / global_batch_size
    frames: FramesSchema = field(default_factory=FramesSchema)
    max_tokens: int = 32768  # model_max_length: text + visual tokens of one sample
    image_size: int = MISSING  # ${model.image_size} or ${model.hires_image_size}
    image_mode: str = "anyres"  # square | anyres
    prompt_format: str = "chatml"  # chatml | plain (stage 1: <image> followed by the caption)
    # Where the weights come from: null = the previous stage's export in this run root (stage 1:
    # "parts", i.e. the LLM + UMT weights + a new connector); "parts"; or an HF directory.
    init: Optional[str] = None
    adapter: AdapterSchema = field(default_factory=AdapterSchema)


# --------------------------------------------------------------------------------------------------
# deepspeed/ logger/ launcher/ and the engine
# --------------------------------------------------------------------------------------------------
@dataclass
class DeepSpeedSchema:
    """Typed DeepSpeed knobs; ``videoflash.train.ds_config`` renders the JSON (DeepSpeed itself
    silently ignores misspelt keys, so the JSON is never written by hand)."""

    zero_stage: int = 3
    offload_optimizer: str = "none"  # none | cpu
    offload_param: str = "none"  # none | cpu (ZeRO-3 only)
    pin_memory: bool = True
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    sub_group_size: int = 1_000_000_000
    wall_clock_breakdown: bool = False


@dataclass
class LoggerSchema:
    kind: str = "none"  # wandb | none
    project: str = "videoflash"
    entity: Optional[str] = None
    mode: str = "offline"  # online | offline | disabled
    tags: List[str] = field(default_factory=list)


@dataclass
class LauncherSchema:
    """How the processes come to be and talk (``videoflash.train.distributed``)."""

    kind: str = "local"  # local | slurm
    # local: processes per node when not started by torchrun/srun; null = every visible GPU (CPU: 1;
    # above 1 on CPU: that many data-parallel ranks over gloo)
    nproc_per_node: Optional[int] = None
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    dist_timeout_min: int = 30
    requeue: bool = False  # on preemption rank 0 runs `scontrol requeue $SLURM_JOB_ID`
    preempt_signals: List[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])


@dataclass
class TrainSchema:
    """The engine's knobs that do not change between stages."""

    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: bool = True
    grad_clip: float = 1.0
    log_every: int = 1
    checkpoint_every: int = 500  # optimizer steps between checkpoints (0 = only at preemption)
    keep_checkpoints: int = 2
    # checkpoints load as data (tensors, plain containers, DeepSpeed's loss scaler); true unpickles
    # this run's checkpoint files without restriction: only for files you trust
    trust_checkpoint_pickle: bool = False
    # stop this process after this optimizer step with a checkpoint and the preemption exit code,
    # as if preempted there (tests, debugging); null = run the stage to its end
    stop_after_steps: Optional[int] = None
    export_dtype: str = "bf16"  # the stage-end HF export: bf16 | fp16 | fp32
    peak_tflops: Optional[float] = None  # per device, for MFU; null = look the GPU up
    cpu_threads: Optional[int] = None  # torch threads per process on CPU; null = torch default
    # sequence parallelism of the LLM (DeepSpeed-Ulysses): every row is split over this many
    # consecutive ranks, which read the same samples; it must divide the world size and the LLM's
    # attention and key-value heads; 1 = off (docs/scale.md, "Sequence parallelism")
    sequence_parallel: int = 1
    progress_bar: bool = True


@dataclass
class EvalSchema:
    """Held-out synthetic accuracy (``videoflash.eval``)."""

    max_samples: Optional[int] = None  # null = every held-out question
    max_new_tokens: int = 8
    batch_size: int = 16


@dataclass
class VideoFlashSchema:
    name: str = "default"
    run_root: str = "runs/${name}"  # shared by every rank and every stage; never per process
    seed: int = 1234
    resume: str = "auto"  # auto (latest checkpoint of this stage, if any) | never | <checkpoint dir>
    stage: StageSchema = field(default_factory=StageSchema)
    model: ModelSchema = field(default_factory=ModelSchema)
    data: DataSchema = field(default_factory=DataSchema)
    deepspeed: DeepSpeedSchema = field(default_factory=DeepSpeedSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    launcher: LauncherSchema = field(default_factory=LauncherSchema)
    train: TrainSchema = field(default_factory=TrainSchema)
    eval: EvalSchema = field(default_factory=EvalSchema)


# --------------------------------------------------------------------------------------------------
# Resolvers and registration
# --------------------------------------------------------------------------------------------------
def _per_stage(stage_id: Any, *values: Any) -> Any:
    """``${vf.per_stage:${stage.id},v1,v2,v3,v4}``: the value for the current stage (experiments that
    tune each stage differently, e.g. the quickstart's step counts)."""
    index = int(stage_id) - 1
    if not 0 <= index < len(values):
        raise ValueError(f"vf.per_stage: stage {stage_id} has no value among {list(values)}")
    return values[index]


def register() -> None:
    """Register the schema and the resolvers (idempotent)."""
    if not OmegaConf.has_resolver("vf.per_stage"):
        OmegaConf.register_new_resolver("vf.per_stage", _per_stage)
    ConfigStore.instance().store(name="videoflash_schema", node=VideoFlashSchema)


register()
