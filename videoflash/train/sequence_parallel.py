"""Sequence parallelism for the LLM: DeepSpeed-Ulysses over DeepSpeed's own sequence-parallel groups.

``train.sequence_parallel = N`` splits every packed row over N ranks (an *SP group*) after the visual
tokens are spliced in. Each rank holds a contiguous 1/N of the sequence through the decoder layers;
in attention, DeepSpeed's Ulysses layer (:class:`deepspeed.sequence.layer.DistributedAttention`)
exchanges the sequence split for a head split (all-to-all), so that every rank attends over the
WHOLE sequence with 1/N of the heads, and exchanges back. What selects tokens (visual dropout)
gathers the sequence and decides over all of it as one rank would.

Pieces:

- the process groups: :func:`initialize` builds DeepSpeed's sequence-parallel and
  sequence-data-parallel groups (``deepspeed.runtime.sequence_parallel.parallel_state_sp``), the
  object ``deepspeed.initialize(mpu=...)`` takes. ZeRO-3 then shards parameters and reduces
  gradients over all ranks (DeepSpeed's rule for SP), averaging over the data-parallel ranks only:
  the ranks of one SP group each hold a share of the same sample's gradient, which DeepSpeed sums.
- :class:`UlyssesSequenceParallel`: the object the model is given
  (``VideoFlashForConditionalGeneration.set_sequence_parallel``): ``split`` / ``gather`` /
  ``reduce_sum`` over the SP group, and the attention function registered with transformers as
  ``vf_ulysses`` (``transformers.AttentionInterface``; the LLM's ``attn_implementation``
  is switched to it, the core attention it wraps is the configured one, e.g. ``sdpa``).
- data: the ranks of one SP group read the SAME samples; the loader is dealt over the data-parallel
  ranks (:func:`data_parallel_rank`), not over all ranks.

The model package (``videoflash/model``) never imports this module nor DeepSpeed: it only calls the
object's methods (it is copied into exported checkpoints).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from videoflash.config import ConfigError

KEY = "train.sequence_parallel"

#: the name under which the Ulysses attention is registered with transformers
ATTENTION_NAME = "vf_ulysses"  # no "flash" in it: transformers takes any such name for flash-attention

_ACTIVE: "UlyssesSequenceParallel | None" = None


def data_parallel_size(world_size: int, sequence_parallel: int) -> int:
    """Data-parallel ranks: ``world / sp``; the world size must split into SP groups."""
    if sequence_parallel < 1:
        raise ConfigError(KEY, f"must be >= 1, got {sequence_parallel}")
    if world_size % sequence_parallel:
        raise ConfigError(KEY, f"{sequence_parallel} does not divide the {world_size} rank(s) into sequence-parallel groups")
    return world_size // sequence_parallel


def data_parallel_rank(rank: int, sequence_parallel: int) -> int:
    """The data-parallel rank of global ``rank``: SP groups are consecutive ranks (DeepSpeed's layout:
    ranks ``[i*sp, (i+1)*sp)`` form SP group i), so the ranks of one node share a sample."""
    return rank // sequence_parallel


def check_heads(text_config, sequence_parallel: int) -> None:
    """Ulysses scatters attention heads over the SP group: query and KV heads must divide evenly."""
    heads = int(text_config.num_attention_heads)
    kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
    for what, n in (("attention heads", heads), ("key-value heads", kv_heads)):
        if n % sequence_parallel:
            raise ConfigError(KEY, f"{sequence_parallel} must divide the LLM's {what} "
                                   f"(num_attention_heads={heads}, num_key_value_heads={kv_heads})")


def backward_scale(zero_stage: int, sequence_parallel: int) -> float:
    """The factor on the loss given to ``engine.backward`` so that DeepSpeed's gradient reduction
    yields the gradient of the whole sample.

    Each rank's backward carries its own share of the sample's gradient (the model's loss is reduced
    with :meth:`UlyssesSequenceParallel.reduce_sum`), so the shares of an SP group must be SUMMED and
    only the data-parallel ranks averaged. DeepSpeed 0.19.8 does that for ZeRO-1/2 (it divides by
    world / sp), but ZeRO-3's reduce-scatter (``stage3.__avg_scatter_grads`` ->
    ``reduce_scatter_coalesced``) divides by the whole world, sp x dp: there the loss is scaled by
    sp. ``ds_config.render`` pins ``reduce_scatter`` on for ZeRO-3, so that no bucket takes its other
    path (which divides by world / sp). ``tests/test_sequence_parallel.py`` checks the gradients
    against one rank after every DeepSpeed upgrade."""
    if sequence_parallel <= 1:
        return 1.0
    return float(sequence_parallel) if zero_stage == 3 else 1.0


def initialize(sequence_parallel: int):
    """Create DeepSpeed's sequence-parallel process groups; returns the ``mpu`` for
    ``deepspeed.initialize``. Call on every rank after the process group is up."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    parallel_state_sp.initialize_sequence_parallel(sequence_parallel_size=sequence_parallel)
    return parallel_state_sp


class _ReduceSum(torch.autograd.Function):
    """All-reduce (sum) over the group in the forward; identity in the backward.

    Every rank of the group holds the same reduced value, while each rank's backward carries only
    its own share: DeepSpeed then sums the shares of the SP ranks, which makes the gradient that of
    the whole sequence exactly once."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class UlyssesSequenceParallel:
    """The sequence-parallel hooks of one rank (see the module docstring).

    Args:
        group: the SP process group (DeepSpeed's ``parallel_state_sp.get_sequence_parallel_group()``).
        attn_implementation: the core attention that runs on the gathered sequence: ``sdpa`` or a
            flash-attention / flex entry of ``transformers.AttentionInterface``.
    """

    def __init__(self, group, attn_implementation: str = "sdpa"):
        from deepspeed.sequence.layer import DistributedAttention
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if attn_implementation in (None, "eager", ATTENTION_NAME) or attn_implementation not in ALL_ATTENTION_FUNCTIONS:
            raise ConfigError(KEY, "Ulysses wraps one of transformers' registered attention functions "
                                   f"(model.attn_implementation sdpa, flash_attention_2, ...), got {attn_implementation!r}")
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.attn_implementation = attn_implementation
        self._core = ALL_ATTENTION_FUNCTIONS[attn_implementation]
        # [batch, sequence, heads, head_dim] in and out: scatter the heads (2), gather the sequence (1)
        self._ulysses = DistributedAttention(self._local_attention, group, scatter_idx=2, gather_idx=1)

    # -- the hooks the model calls ----------------------------------------------------------------
    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous chunk of ``x`` along ``dim`` (whose size must be a multiple of
        ``size``: the model pads). A slice: its gradient is this rank's share."""
        if x.shape[dim] % self.size:
            raise ValueError(f"sequence of {x.shape[dim]} tokens does not split over {self.size} ranks")
        chunk = x.shape[dim] // self.size
        return x.narrow(dim, self.rank * chunk, chunk)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The chunks of every rank, concatenated along ``dim`` in rank order (differentiable: the
        gradient of each chunk is summed over the ranks and returned to its owner)."""
        from torch.distributed.nn.functional import all_gather

        parts = all_gather(x.contiguous(), group=self.group)
        return torch.cat(parts, dim)

    def reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the SP group in the forward, each rank's own share in the backward."""
        return _ReduceSum.apply(x, self.group)

    # -- attention ------------------------------------------------------------------------------------
    def _local_attention(self, query, key, value, module, attention_mask, kwargs):
        """The core attention over the whole sequence and this rank's heads; ``[B, S, h, d]`` in/out."""
        out, _ = self._core(module, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                            attention_mask, **kwargs)
        return out

    def attention(self, module, query, key, value, attention_mask, **kwargs):
        """transformers' attention-function signature (``[B, heads, local S, d]`` query/key/value with
        RoPE applied at global positions; the mask is the whole sequence's, or None for causal)."""
        if kwargs.get("position_ids") is not None:  # flash-attention reads packed rows from them
            kwargs["position_ids"] = torch.cat(self.gather_no_grad(kwargs["position_ids"]), 1)
        out = self._ulysses(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), 0, None,
                            module, attention_mask, kwargs)
        return out, None

    def gather_no_grad(self, x: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return parts


def _attention(module, query, key, value, attention_mask, **kwargs):
    if _ACTIVE is None:
        raise RuntimeError(f"attn_implementation={ATTENTION_NAME!r} runs only inside a sequence-parallel "
                           "training run (videoflash.train.sequence_parallel.install)")
    return _ACTIVE.attention(module, query, key, value, attention_mask, **kwargs)


def install(model, group, attn_implementation: str) -> UlyssesSequenceParallel:
    """Register the Ulysses attention with transformers, switch the LLM to it and give the model its
    sequence-parallel hooks. Returns the hooks object."""
    global _ACTIVE
    from transformers import AttentionInterface

    check_heads(model.config.text_config, dist.get_world_size(group))
    sp = UlyssesSequenceParallel(group, attn_implementation)
    AttentionInterface.register(ATTENTION_NAME, _attention)
    _ACTIVE = sp
    model.language_model.set_attn_implementation(ATTENTION_NAME)
    model.set_sequence_parallel(sp)
    return sp


def uninstall(model, attn_implementation: str) -> None:
    """Undo :func:`install` on ``model`` (the core attention back, no hooks)."""
    global _ACTIVE
    model.set_sequence_parallel(None)
    model.language_model.set_attn_implementation(attn_implementation)
    _ACTIVE = None

