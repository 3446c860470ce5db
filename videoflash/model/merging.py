"""Parameter-free token merging: a clip's 4xL UMT tokens down to 64 (VideoChat-Flash section 1.3).

VideoChat-Flash's clip-level compression ("tome16": 16 tokens per frame on average) repeats ToMe's
bipartite soft matching on the encoder's *output features* until exactly ``target`` tokens remain.
Nothing here is learned; gradients still reach the encoder through the gathers and scatter-adds,
so the ViT trains end to end (the matching itself runs under ``no_grad``).

One step removing ``r`` tokens from ``p``:

1. metric: the features ``[B, p, C]`` split into ``num_heads`` chunks of ``C / num_heads`` channels,
   averaged over the chunks, L2-normalised;
2. set A = tokens at even indices, set B = tokens at odd indices; cosine scores ``A @ B^T``;
3. every A token's best B match and its score; A tokens sorted by that score, descending;
4. the top ``r`` A tokens are merged into their B match by a size-weighted mean (``size`` counts the
   original patches a token stands for, 1 at the start): scatter-add of ``x*size`` and of ``size``,
   then a division;
5. output ``[unmerged A tokens in the sorted order, all B tokens]``: spatial and temporal order is not
   kept, and no position information is added afterwards.

The schedule halves while more than half would remain to be removed, then removes the rest:
784 -> 64 is ``[392, 196, 98, 34]``, 3136 -> 64 is ``[1568, 784, 392, 196, 98, 34]``.

Two choices where the official code leaves the result to chance (they change nothing when there are
no exact ties): the metric is computed in at least float32 whatever the dtype of ``x`` (bf16 cosine
scores tie often), and the sort is stable, so equal scores keep their index order.

This file imports only torch: it is copied verbatim into every exported checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["merge_schedule", "merge_tokens", "bipartite_merge_step"]


def merge_schedule(num_tokens: int, target: int) -> list[int]:
    """The number of tokens removed at each merge step, from ``num_tokens`` down to ``target``.

    At each step with ``p`` tokens: if ``p - target <= p // 2`` remove ``p - target`` (the last
    step), otherwise remove ``p // 2``. Empty when ``target >= num_tokens``.

    >>> merge_schedule(784, 64)
    [392, 196, 98, 34]
    >>> merge_schedule(196, 64)
    [98, 34]
    """
    if target < 1:
        raise ValueError(f"merge target must be >= 1, got {target}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    steps: list[int] = []
    p = num_tokens
    while p > target:
        r = p - target if p - target <= p // 2 else p // 2
        steps.append(r)
        p -= r
    return steps


def _merge_metric(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Head-averaged, L2-normalised features: ``[B, p, C]`` -> ``[B, p, C / num_heads]``, at least fp32."""
    b, p, c = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 -> fp32; fp64 stays fp64
    m = x.detach().to(dtype).reshape(b, p, num_heads, c // num_heads).mean(dim=2)
    return F.normalize(m, dim=-1)


def bipartite_merge_step(
    x: torch.Tensor, size: torch.Tensor, r: int, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One bipartite soft matching step: remove ``r`` tokens by size-weighted merging.

    Args:
        x: features ``[B, p, C]``.
        size: ``[B, p, 1]``, the number of original tokens each token stands for.
        r: tokens to remove, ``0 <= r <= ceil(p / 2)`` (at most the size of set A).
        num_heads: chunks averaged into the similarity metric (``C`` must divide by it).

    Returns:
        ``(x, size)`` with ``p - r`` tokens: unmerged A tokens (best score first), then all B tokens.
    """
    b, p, c = x.shape
    n_a = (p + 1) // 2
    if not 0 <= r <= n_a:
        raise ValueError(f"cannot remove {r} of {p} tokens in one step (at most {n_a})")
    if r == 0:
        return x, size

    with torch.no_grad():
        metric = _merge_metric(x, num_heads)
        scores = metric[:, 0::2] @ metric[:, 1::2].transpose(1, 2)  # [B, |A|, |B|]
        best_score, best_b = scores.max(dim=-1)  # [B, |A|]
        order = best_score.argsort(dim=-1, descending=True, stable=True)  # [B, |A|]
        src = order[:, :r]  # A tokens merged away
        unmerged = order[:, r:]  # A tokens kept, in sorted order
        dst = best_b.gather(1, src)  # their B partners

    # Merge x*size and size together: one gather/scatter for both.
    y = torch.cat([x * size, size.to(x.dtype)], dim=-1)
    w = y.shape[-1]
    y_a, y_b = y[:, 0::2], y[:, 1::2]
    kept = y_a.gather(1, unmerged[..., None].expand(-1, -1, w))
    moved = y_a.gather(1, src[..., None].expand(-1, -1, w))
    y_b = y_b.scatter_add(1, dst[..., None].expand(-1, -1, w), moved)
    y = torch.cat([kept, y_b], dim=1)

    new_size = y[..., c:].detach()  # sizes carry no gradient
    return y[..., :c] / new_size, new_size


def merge_tokens(x: torch.Tensor, target: int, num_heads: int) -> torch.Tensor:
    """Merge ``[B, P, C]`` tokens down to ``[B, target, C]`` (see the module docstring).

    Runs the steps of :func:`merge_schedule` (P, target). Returns ``x`` itself when
    ``target >= P``. Vectorised over the batch; works for any P, odd counts included.
    """
    if x.dim() != 3:
        raise ValueError(f"merge_tokens expects [B, P, C], got {tuple(x.shape)}")
    b, p, c = x.shape
    if target < 1:
        raise ValueError(f"merge target must be >= 1, got {target}")
    if target >= p:
        return x
    if num_heads < 1 or c % num_heads:
        raise ValueError(f"feature width {c} is not divisible by num_heads {num_heads}")
    size = torch.ones(b, p, 1, dtype=x.dtype, device=x.device)
    for r in merge_schedule(p, target):
        x, size = bipartite_merge_step(x, size, r, num_heads)
    return x
