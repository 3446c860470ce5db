"""Progressive visual-token dropout inside the LLM (VideoChat-Flash §2, "video-level compression").

At chosen layers the visual tokens still present are reduced to a share of the ORIGINAL visual count:

* ``uniform``: evenly spaced tokens are kept (``linspace`` over the tokens present);
* ``text``: text-guided: the attention of the query tokens onto the visual tokens is computed with
  the projections and RoPE of the layer about to run, averaged over heads and query tokens, and the
  top-k visual tokens are kept.

Kept tokens always stay in their original order. These are pure functions over tensors; the layer
loop that uses them is in ``modeling_videoflash.py``.

The arithmetic is VideoChat-Flash's own (``flash_rank_drop``), so that a converted release keeps the
very tokens the original keeps:

* counts: ``int(N * r)`` of the original count ``N`` (truncated: 0.3 of 256 keeps 76);
* uniform indices: ``torch.linspace(0, n - 1, k, dtype=torch.long)`` on the CPU, i.e. truncated (not
  rounded) evenly spaced positions; torch computes them from both ends (``step * i`` for the first
  half, ``(n - 1) - step * (k - 1 - i)`` for the rest), which this module does not re-derive;
* text-guided scores: Q, K, RoPE and ``QK^T / sqrt(d)`` in the model's dtype, the softmax in float32
  then cast back, the means over heads and queries in the model's dtype (bf16 for a bf16 model),
  and the top-k taken on those values.
"""

from __future__ import annotations

import math

import torch


def keep_count(num_original: int, ratio: float) -> int:
    """Visual tokens kept when ``ratio`` of ``num_original`` is to remain: ``int(N * r)``, truncated."""
    return int(num_original * ratio)


def uniform_keep(num_present: int, k: int, device=None) -> torch.Tensor:
    """Indices (into the tokens present) of ``k`` evenly spaced tokens, first and last included,
    truncated as ``torch.linspace(0, n - 1, k, dtype=torch.long)`` computes them on the CPU."""
    if k >= num_present:
        return torch.arange(num_present, device=device)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.linspace(0, num_present - 1, k, dtype=torch.long).to(device)


def topk_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores (compared in their own dtype), in increasing order."""
    k = min(int(k), scores.numel())
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    return torch.topk(scores, k).indices.sort().values


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def text_guided_attention(
    hidden_states: torch.Tensor,
    layer: torch.nn.Module,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_index: torch.Tensor,
    key_valid: torch.Tensor,
    query_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each query token onto every token, averaged over heads, as ``layer`` computes it.

    Args:
        hidden_states: ``[B, L, D]`` input of ``layer`` (detached here: selection is not trained).
        layer: an HF decoder layer with ``input_layernorm`` and ``self_attn.{q_proj,k_proj}``.
        position_embeddings: ``(cos, sin)`` of shape ``[B, L, head_dim]`` at the current positions.
        query_index: ``[B, Q]`` positions of the query tokens (padded entries arbitrary).
        key_valid: ``[B, L]`` bool, which tokens are real (not padding).
        query_start: ``[B, Q]`` or None: in a packed row, the first token of each query's own
            sample; keys before it (other samples) get no attention.

    Returns:
        ``[B, Q, L]`` in the model's dtype: softmax(QK^T / sqrt(d) + mask) averaged over heads. QK^T
        and the mean run in the model's dtype and the softmax in float32 cast back to it, as the
        reference does (so a bf16 model picks what the original picks).
    """
    attn = layer.self_attn
    head_dim = attn.head_dim
    groups = attn.num_key_value_groups
    bsz, length, _ = hidden_states.shape
    with torch.no_grad():
        normed = layer.input_layernorm(hidden_states.detach())
        q_in = torch.gather(normed, 1, query_index[..., None].expand(-1, -1, normed.shape[-1]))
        q = attn.q_proj(q_in).view(bsz, q_in.shape[1], -1, head_dim).transpose(1, 2)  # [B,H,Q,d]
        k = attn.k_proj(normed).view(bsz, length, -1, head_dim).transpose(1, 2)  # [B,Hkv,L,d]
        cos, sin = (t.to(q.dtype) for t in position_embeddings)
        q_cos = torch.gather(cos, 1, query_index[..., None].expand(-1, -1, cos.shape[-1]))[:, None]
        q_sin = torch.gather(sin, 1, query_index[..., None].expand(-1, -1, sin.shape[-1]))[:, None]
        q = q * q_cos + _rotate_half(q) * q_sin
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        k = k.repeat_interleave(groups, dim=1)
        logits = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(head_dim)  # [B,H,Q,L]
        keys = torch.arange(length, device=hidden_states.device)
        allowed = (keys[None, None, :] <= query_index[..., None]) & key_valid[:, None, :]  # [B,Q,L]
        if query_start is not None:
            allowed = allowed & (keys[None, None, :] >= query_start[..., None])
        logits = logits.masked_fill(~allowed[:, None], torch.finfo(logits.dtype).min)
        return logits.softmax(dim=-1, dtype=torch.float32).to(logits.dtype).mean(dim=1)  # [B,Q,L]


def text_guided_scores(
    hidden_states: torch.Tensor,
    layer: torch.nn.Module,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_index: torch.Tensor,
    query_valid: torch.Tensor,
    key_valid: torch.Tensor,
) -> torch.Tensor:
    """Mean attention of the query tokens onto every token, as ``layer`` would compute it.

    Args: those of :func:`text_guided_attention`, plus ``query_valid``: ``[B, Q]`` bool, which
    entries of ``query_index`` are real.

    Returns:
        ``[B, L]`` in the dtype of ``hidden_states``: softmax(QK^T / sqrt(d) + causal mask) averaged
        over heads, then over the valid queries of each sample. Keys after a query (causal) or
        padding get no attention. QK^T and the means run in the model's dtype and the softmax in
        float32 cast back to it, as the reference does (so a bf16 model picks what the original picks).
    """
    bsz, length, _ = hidden_states.shape
    with torch.no_grad():
        probs = text_guided_attention(hidden_states, layer, position_embeddings, query_index, key_valid)
        rows = [probs[b, query_valid[b]].mean(0) if query_valid[b].any() else probs.new_zeros(length)
                for b in range(bsz)]
        probs = torch.stack(rows).to(hidden_states.dtype)
    return probs
