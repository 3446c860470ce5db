"""Training-free KV-cache compression for long videos: the pure functions and the cache.

Two published methods share one engine (``chunked_prefill.py``): the video is prefilled in chunks
of frames and, after each chunk, a policy shrinks that chunk's KV cache before the next one runs.

* **AdaReTaKe** (arXiv 2503.12559) keeps the chunk tokens the question attends to most. The
  question is appended to every chunk while it is prefilled (its KV is removed right after), and
  :func:`prompt_scores` turns the question's attention into one score per chunk token. The kept
  share follows a global ratio ``r = budget / input length``; :func:`temporal_ratios` spreads it
  over chunks (chunks that differ from their neighbours keep more) and :func:`layer_ratios` over
  layers (AdaKV: a global top-k across layers, +1 smoothing).
* **Video-X²L** (arXiv 2506.21184) keeps two question-independent KVs per chunk: a low-compression
  one (top-k at ``1/alpha_l``) and a high-compression one (:func:`pool_kv` at stride ``alpha_h``).
  For each question, :func:`chunk_relevance` ranks the chunks; the top ones are loaded as L-KV,
  the rest as H-KV.

The formulas follow ../shared/reference/kv_compression.md (A.2, A.4, A.5(c), B.4(b), B.7), which
reconstructs them from the authors' code. Everything here is plain tensors except
:class:`CompressedCache`, a ``transformers`` ``DynamicCache`` whose layers the engine shrinks in
place through its Cache API (``layers[i].keys/values``); attention itself is transformers' own.

This file is copied into every exported checkpoint: it imports only torch and transformers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

__all__ = [
    "prompt_scores",
    "self_scores",
    "key_norm_scores",
    "layer_ratios",
    "water_fill",
    "temporal_ratios",
    "frame_distance_ratios",
    "chunk_relevance",
    "pool_kv",
    "topk_sorted",
    "rerotate",
    "compress_positions",
    "CompressedCache",
]

#: the box of A.5(c): a chunk keeps at least 0.1% and at most all of its tokens
TEMPORAL_BOUNDS = (1e-3, 1.0)


# --------------------------------------------------------------------------------------------------
# token scores
# --------------------------------------------------------------------------------------------------


def _group_mean(per_head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[H, n]`` -> ``[n]``: mean within each GQA group (query head h reads KV head h // g), then
    over the KV heads."""
    heads, n = per_head.shape
    if heads % num_kv_heads:
        raise ValueError(f"{heads} query heads do not split into {num_kv_heads} KV-head groups")
    return per_head.view(num_kv_heads, heads // num_kv_heads, n).mean(1).mean(0)


def prompt_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """AdaReTaKe's token scores (A.2): how much the prompt attends to each chunk token.

    Args:
        q: ``[H, P, d]`` the prompt's queries after RoPE.
        k: ``[Hkv, n, d]`` the chunk's keys after RoPE (past cache and prompt keys excluded).

    Returns:
        ``[n]`` float32: softmax over the chunk keys (no mask) of ``q k^T / sqrt(d)``, summed over
        the prompt queries, averaged within each GQA group, then over the KV heads.
    """
    heads, _, d = q.shape
    kv_heads = k.shape[0]
    keys = k.float().repeat_interleave(heads // kv_heads, dim=0)  # [H, n, d]
    attn = torch.matmul(q.float(), keys.transpose(1, 2)).mul_(d**-0.5).softmax(-1)  # [H, P, n]
    return _group_mean(attn.sum(1), kv_heads)


def self_scores(q: torch.Tensor, k: torch.Tensor, block: int = 1) -> torch.Tensor:
    """Question-free scores of a chunk (ReTaKe's PivotKV, A.7): the attention every chunk token's
    query pays to each chunk key, without a mask, summed over the queries, averaged as
    :func:`prompt_scores`. ``q`` ``[H, n, d]``; computed ``block`` query heads at a time to bound the
    ``[n, n]`` matrix."""
    heads, n, d = q.shape
    kv_heads = k.shape[0]
    groups = heads // kv_heads
    out = torch.empty(heads, k.shape[1], dtype=torch.float32, device=q.device)
    for lo in range(0, heads, block):
        hs = range(lo, min(heads, lo + block))
        keys = torch.stack([k[h // groups] for h in hs]).float()
        attn = torch.matmul(q[lo : lo + len(hs)].float(), keys.transpose(1, 2)).mul_(d**-0.5).softmax(-1)
        out[lo : lo + len(hs)] = attn.sum(1)
    return _group_mean(out, kv_heads)


def key_norm_scores(k: torch.Tensor) -> torch.Tensor:
    """``[Hkv, n, d]`` -> ``[n]``: minus the mean L2 norm of each token's keys over the KV heads
    (low key norms draw high attention; the highest score is the token to keep)."""
    return -k.float().norm(dim=-1).mean(0)


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores in increasing order (temporal order is kept)."""
    k = max(0, min(int(k), scores.numel()))
    return torch.topk(scores.float(), k).indices.sort().values


# --------------------------------------------------------------------------------------------------
# budget allocation
# --------------------------------------------------------------------------------------------------


def layer_ratios(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """AdaKV allocation over layers (A.4): ``scores`` ``[L, n]`` -> per-layer ratios ``[L]``.

    The ``B = int(max(1, ratio * n) * L)`` highest scores of all layers together are selected; with
    ``c_l`` of them in layer ``l``, ``r_l = L * ratio * (c_l + 1) / sum(c + 1)`` (the +1 keeps every
    layer above zero). The ratios average ``ratio``."""
    layers, n = scores.shape
    budget = min(int(max(1.0, ratio * n) * layers), layers * n)
    top = torch.topk(scores.float().flatten(), budget).indices
    counts = torch.bincount(top // n, minlength=layers).double() + 1.0
    return (layers * ratio * counts / counts.sum()).float()


def water_fill(raw: torch.Tensor, total: float, lo: float = TEMPORAL_BOUNDS[0], hi: float = TEMPORAL_BOUNDS[1],
               iterations: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Project ``raw`` (``[m]``, non-negative) onto ``{x : lo <= x <= hi, sum x = total}`` by an
    additive shift (A.5(c) step 6): ``x = clip(raw / sum(raw) * total - mu, lo, hi)`` with ``mu``
    found by bisection. ``total`` outside ``[m lo, m hi]`` gives the nearest bound everywhere."""
    m = raw.numel()
    if total >= m * hi:
        return torch.full_like(raw, hi, dtype=torch.float64).float()
    if total <= m * lo:
        return torch.full_like(raw, lo, dtype=torch.float64).float()
    raw = raw.double()
    s = raw.sum()
    q = raw / s * total if s > 0 else torch.full_like(raw, total / m)
    below, above = float(q.min() - hi), float(q.max() - lo)  # mu bounds: sum is hi*m at below, lo*m at above
    for _ in range(iterations):
        mu = 0.5 * (below + above)
        gap = float((q - mu).clamp(lo, hi).sum()) - total
        if abs(gap) < tol:
            break
        if gap > 0:
            below = mu
        else:
            above = mu
    return (q - 0.5 * (below + above)).clamp(lo, hi).float()


def temporal_ratios(chunk_features: torch.Tensor, ratio: float, bounds=TEMPORAL_BOUNDS) -> torch.Tensor:
    """Per-chunk ratios from chunk-neighbour distance (A.5(c), the authors' 2026 code).

    ``chunk_features`` ``[m, D]`` is the mean visual embedding of each chunk. With the first and
    last chunk duplicated at the edges, ``d_i = ((1 - cos(c_i, c_{i-1})) + (1 - cos(c_i, c_{i+1}))) / 2``;
    the raw ratios ``ratio * d_i / mean(d)`` are water-filled onto ``bounds`` with sum ``ratio * m``.
    ``ratio >= 1``, one chunk, or chunks all alike give ``ratio`` everywhere."""
    m = chunk_features.shape[0]
    if ratio >= 1.0 or m < 2:
        return torch.full((m,), float(ratio))
    c = chunk_features.double()
    padded = torch.cat([c[:1], c, c[-1:]])
    before = 1 - F.cosine_similarity(padded[1:-1], padded[:-2], dim=-1)
    after = 1 - F.cosine_similarity(padded[1:-1], padded[2:], dim=-1)
    return _distance_ratios(0.5 * (before + after), ratio, bounds)


def frame_distance_ratios(chunk_frames: list[torch.Tensor], ratio: float, bounds=TEMPORAL_BOUNDS) -> torch.Tensor:
    """Per-chunk ratios from within-chunk frame change (A.5(a), the paper's description).

    ``chunk_frames[i]`` ``[T_i, N, D]`` holds the visual tokens of chunk i frame by frame;
    ``d_i`` is the mean over adjacent frame pairs and tokens of ``1 - cos(x_t, x_{t-1})`` (a chunk of
    one frame takes the mean of the others); then as :func:`temporal_ratios`."""
    m = len(chunk_frames)
    if ratio >= 1.0 or m < 2:
        return torch.full((m,), float(ratio))
    dist = []
    for f in chunk_frames:
        f = f.double()
        dist.append((1 - F.cosine_similarity(f[1:], f[:-1], dim=-1)).mean() if f.shape[0] > 1 else None)
    known = [x for x in dist if x is not None]
    fill = torch.stack(known).mean() if known else torch.tensor(1.0, dtype=torch.float64)
    return _distance_ratios(torch.stack([fill if x is None else x for x in dist]), ratio, bounds)


def _distance_ratios(d: torch.Tensor, ratio: float, bounds) -> torch.Tensor:
    m = d.numel()
    mean = d.mean()
    if not mean > 1e-12:
        return torch.full((m,), float(ratio))
    return water_fill(ratio * d / mean, ratio * m, *bounds)


# --------------------------------------------------------------------------------------------------
# Video-X²L
# --------------------------------------------------------------------------------------------------


def chunk_relevance(q: torch.Tensor, chunk_keys: list[torch.Tensor]) -> torch.Tensor:
    """Relevance of each chunk to a question (B.4(b)): ``q`` ``[H, P, d]`` the question's queries,
    ``chunk_keys[i]`` ``[Hkv, n_i, d]``. The cosine between the queries mean-pooled over P and each
    chunk's keys mean-pooled over its tokens, KV heads repeated to the query heads (query head h
    reads KV head ``h // (H / Hkv)``), heads concatenated. Returns ``[m]``."""
    heads = q.shape[0]
    query = q.float().mean(1).flatten()
    means = torch.stack([k.float().mean(1) for k in chunk_keys])  # [m, Hkv, d]
    keys = means.repeat_interleave(heads // means.shape[1], dim=1).flatten(1)  # [m, H*d]
    return F.cosine_similarity(keys, query[None], dim=-1)


def pool_kv(x: torch.Tensor, stride: int) -> torch.Tensor:
    """``[Hkv, n, d]`` -> ``[Hkv, ceil(n / stride), d]``: the mean of each run of ``stride`` tokens
    (the last run may be shorter)."""
    heads, n, d = x.shape
    stride = int(stride)
    if stride < 1:
        raise ValueError(f"the pooling stride must be >= 1, got {stride}")
    groups = -(-n // stride)
    pad = groups * stride - n
    total = F.pad(x.float(), (0, 0, 0, pad)).view(heads, groups, stride, d).sum(2)
    counts = torch.full((groups,), float(stride), device=x.device)
    counts[-1] = stride - pad
    return (total / counts[None, :, None]).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# positions
# --------------------------------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rerotate(k: torch.Tensor, old: tuple[torch.Tensor, torch.Tensor], new: tuple[torch.Tensor, torch.Tensor],
             scaling: float = 1.0) -> torch.Tensor:
    """Keys rotated at one set of positions -> the same keys rotated at others.

    ``old`` / ``new`` are the ``(cos, sin)`` a transformers rotary embedding returns (``[n, d]``,
    already multiplied by its ``attention_scaling`` s, e.g. YaRN's mscale); ``k`` is ``[Hkv, n, d]``.
    Undoing ``k' = k c s + rot(k) sn s`` is ``(k' c s - rot(k') sn s) / s^2`` (A.6)."""
    kf = k.float()
    c0, s0 = (t.float()[None] for t in old)
    c1, s1 = (t.float()[None] for t in new)
    plain = (kf * c0 - _rotate_half(kf) * s0) / (scaling * scaling)
    return (plain * c1 + _rotate_half(plain) * s1).to(k.dtype)


def compress_positions(t: torch.Tensor, start: int, ratio: float) -> torch.Tensor:
    """AdaReTaKe's position reforge (A.6): ``t' = start + floor((t - start) * ratio)``."""
    return start + torch.floor((t - start).double() * ratio).long()


# --------------------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------------------


class CompressedCache(DynamicCache):
    """A ``DynamicCache`` whose layers may hold different numbers of tokens.

    The engine grows it through the ordinary ``update`` calls of transformers' attention layers,
    then shrinks the newest chunk of each layer with :meth:`keep` (or :meth:`put`) and drops the
    guide prompt with :meth:`drop_last`; :meth:`replace` installs a layer assembled elsewhere (Video-X²L's mixed
    L/H-KV). ``allocations[l]`` records, per compressed chunk, how many tokens layer ``l`` kept."""

    def __init__(self, num_layers: int):
        super().__init__()
        self.allocations: list[list[int]] = [[] for _ in range(num_layers)]

    def layer_length(self, layer_idx: int) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def tail(self, layer_idx: int, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[Hkv, length, d]`` of ``length`` tokens from ``start`` (batch of one)."""
        layer = self.layers[layer_idx]
        return layer.keys[0, :, start : start + length], layer.values[0, :, start : start + length]

    def keep(self, layer_idx: int, start: int, length: int, index: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        """Of the ``length`` tokens from ``start``, keep those at ``index`` (sorted); what follows
        them is dropped too. ``keys`` replaces the kept keys (re-rotated positions)."""
        layer = self.layers[layer_idx]
        index = index.to(layer.keys.device)
        if keys is None:
            keys = layer.keys[0, :, start : start + length].index_select(1, index)
        self.put(layer_idx, start, keys, layer.values[0, :, start : start + length].index_select(1, index))

    def put(self, layer_idx: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace layer ``layer_idx`` from token ``start`` on by ``keys`` / ``values`` ``[Hkv, m, d]``
        (a compressed chunk); ``m`` is recorded in ``allocations``."""
        layer = self.layers[layer_idx]
        layer.keys = torch.cat([layer.keys[:, :, :start], keys[None].to(layer.keys.dtype)], 2)
        layer.values = torch.cat([layer.values[:, :, :start], values[None].to(layer.values.dtype)], 2)
        self.allocations[layer_idx].append(int(keys.shape[1]))

    def drop_last(self, layer_idx: int, count: int) -> None:
        if count:
            self.layers[layer_idx].crop(-count)

    def replace(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Install ``[1, Hkv, n, d]`` keys and values as layer ``layer_idx``."""
        while len(self.layers) <= layer_idx:
            self.layers.append(self.layer_class_to_replicate())
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
