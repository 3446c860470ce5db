"""The DeepSpeed JSON, rendered from typed config fields.

DeepSpeed does not validate key names (a typo silently falls back to the default), so the JSON is
never written by hand: every key below comes from ``configs/deepspeed/*.yaml`` through the schema
(``DeepSpeedSchema``), the stage's batch sizes and the engine's precision. The optimizer and the LR
schedule are torch objects passed to ``deepspeed.initialize`` (per-module learning rates, no JIT
build of DeepSpeed's fused Adam on CPU), so the JSON has no ``optimizer`` / ``scheduler`` block.
"""

from __future__ import annotations

from typing import Any

from videoflash.config.schema import DeepSpeedSchema

# Logging of DeepSpeed's own step counter: effectively never (the trainer logs).
_NEVER = 10**9


def gradient_accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-batches per optimizer step on one rank; the global batch must split evenly."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ValueError(
            f"stage.global_batch_size={global_batch} is not a multiple of "
            f"stage.micro_batch_size x world size = {micro_batch} x {world_size} = {per_step}"
        )
    return global_batch // per_step


def render(
    ds: DeepSpeedSchema,
    *,
    global_batch: int,
    micro_batch: int,
    world_size: int,
    bf16: bool,
    grad_clip: float,
    sequence_parallel: int = 1,
) -> dict[str, Any]:
    """The DeepSpeed config dict for one stage on ``world_size`` data-parallel ranks (each a group
    of ``sequence_parallel`` ranks that share their samples)."""
    gas = gradient_accumulation_steps(global_batch, micro_batch, world_size)
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = ds.allgather_bucket_size
    if ds.zero_stage == 3:
        zero.update(
            {
                "sub_group_size": ds.sub_group_size,
                "stage3_prefetch_bucket_size": ds.prefetch_bucket_size,
                "stage3_param_persistence_threshold": ds.param_persistence_threshold,
                "stage3_max_live_parameters": ds.max_live_parameters,
                "stage3_max_reuse_distance": ds.max_reuse_distance,
                # the stage-end export gathers the 16-bit weights on rank 0
                "stage3_gather_16bit_weights_on_model_save": True,
                # DeepSpeed's default, pinned: every bucket is averaged the same way (over all
                # ranks), which sequence_parallel.backward_scale relies on
                "reduce_scatter": True,
            }
        )
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": ds.pin_memory}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param, "pin_memory": ds.pin_memory}
    out: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # the optimizer is a torch AdamW (or DeepSpeedCPUAdam with optimizer offload)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": ds.wall_clock_breakdown,
    }
    if sequence_parallel > 1:
        # read where DeepSpeed has no mpu yet (zero.Init under from_pretrained): the batch then
        # splits over world / sp ranks, as with the sequence-parallel mpu of deepspeed.initialize
        out["sequence_parallel_size"] = sequence_parallel
    return out
