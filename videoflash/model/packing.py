"""Packed rows in the LLM: several samples in one sequence, attention never crossing a sample.

A packed micro-batch (docs/contracts.md section 1) holds rows of whole samples one after another;
``sample_lengths[r]`` lists the ``input_ids`` lengths of row ``r``'s samples in order (zeros after
the last). Inside the model every sample of the micro-batch is laid end to end in ONE flat sequence
``[1, T]`` without padding (rows only bound the data's memory); each sample:

* has its visual tokens spliced at its own placeholder, its RoPE positions counted from 0;
* attends only to itself. How depends on the LLM's attention implementation:

  - ``eager`` / ``sdpa``: a dense block-diagonal causal mask (exact; the CPU path);
  - ``flash_attention_2``: the cumulative lengths (``cu_seq_lens_*``, transformers'
    ``FlashAttentionKwargs``), which transformers hands to flash-attn's ``flash_attn_varlen_func``;
  - ``flex_attention``: a FlexAttention document mask (``BlockMask``) for transformers' flex path;
  - ``packed_varlen`` (registered here with ``transformers.AttentionInterface``): the
    cumulative lengths, for :func:`varlen_attention`, which picks flash-attn's varlen kernel when it
    is installed, else PyTorch's own (``torch.nn.attention.varlen``), else FlexAttention with a
    document mask, all on CUDA; elsewhere causal SDPA sample by sample. Unpacked calls
    (decoding, unpacked batches) go to transformers' SDPA function unchanged;
* drops its own visual tokens at the drop points (uniform: evenly over its own span; text-guided:
  by the attention of its own query tokens onto its own visual tokens), its boundaries shrinking;
* is never predicted from the sample before it: the label of each sample's first token is ignored
  (nothing of the sample precedes it), so the loss over the flat row is the token-weighted mean of
  the samples' losses.

Only the modules every unpacked forward calls are called, once each per layer and drop point,
whatever the number of samples (ZeRO-3). This file is copied into exported checkpoints: it imports
only torch and its siblings.
"""

from __future__ import annotations

from dataclasses import dataclass

import importlib.util
from functools import lru_cache

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .visual_dropout import keep_count, text_guided_attention, topk_keep, uniform_keep

IGNORE_INDEX = -100
#: the attention implementation name registered by this module
VARLEN = "packed_varlen"


@dataclass
class Segments:
    """Where each sample of the flat sequence is (absolute token indices)."""

    starts: list[int]
    lengths: list[int]
    vis_starts: list[int]
    vis_counts: list[int]
    originals: list[int]  # visual tokens before any drop (the keep ratios refer to them)
    queries: list[list[int]]  # query tokens of text-guided dropout, per sample (may be empty)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def segment_ids(self, device) -> torch.Tensor:
        """``[T]``: the sample each token belongs to."""
        lengths = torch.tensor(self.lengths, device=device)
        return torch.repeat_interleave(torch.arange(len(self.lengths), device=device), lengths)

    def positions(self, device) -> torch.Tensor:
        """``[1, T]``: 0.. within each sample."""
        return torch.cat([torch.arange(n, device=device) for n in self.lengths])[None]


def split_rows(sample_lengths: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(row, offset, length)`` of every sample of a packed batch, in order; checks that the lengths
    fit the rows and cover exactly their real tokens."""
    if sample_lengths.ndim != 2 or sample_lengths.shape[0] != attention_mask.shape[0]:
        raise ValueError(f"sample_lengths must be [rows, samples] with {attention_mask.shape[0]} rows, "
                         f"got {tuple(sample_lengths.shape)}")  # fmt: skip
    out = []
    for r, row in enumerate(sample_lengths.tolist()):
        offset = 0
        for n in row:
            if n < 0:
                raise ValueError(f"sample_lengths[{r}] holds a negative length: {row}")
            if n:
                out.append((r, offset, int(n)))
                offset += int(n)
        real = int(attention_mask[r].sum())
        if offset != real or not bool(attention_mask[r, :offset].all()):
            raise ValueError(f"row {r}: sample_lengths sum to {offset}, the attention mask has {real} real tokens "
                             "(a packed row is its samples end to end, then padding)")  # fmt: skip
    if not out:
        raise ValueError("a packed batch holds no sample")
    return out


def _queries(labels: torch.Tensor | None, start: int, length: int, given: int | None) -> list[int]:
    """Query tokens of one sample (absolute): a given one, else (labels) the token before each
    answer span inside the sample, else its last token."""
    if given is not None:
        return [start + given]
    if labels is None:
        return [start + length - 1]
    lab = labels[start : start + length]
    starts = (lab[:-1] == IGNORE_INDEX) & (lab[1:] != IGNORE_INDEX)
    return [start + int(i) for i in starts.nonzero()[:, 0].tolist()]


def splice_packed(model, input_ids, attention_mask, labels, sample_lengths, per_sample, anchor, query_positions):
    """The flat sequence of a packed batch: embeddings ``[1, T, D]``, labels ``[1, T]`` (or None;
    each sample's first label ignored) and the :class:`Segments`.

    ``per_sample``: the visual tokens of each sample (None for text-only), in sample order;
    ``query_positions``: None or ``[N]`` indices into each sample's own ``input_ids``."""
    spans = split_rows(sample_lengths, attention_mask)
    embed = model.get_input_embeddings()
    placeholder = input_ids == model.config.image_token_id
    text = embed(input_ids.masked_fill(placeholder, 0))
    if anchor is not None:
        text = text + anchor.to(text.dtype)
    pieces, labs = [], []
    seg = Segments([], [], [], [], [], [])
    pos = 0
    for j, (r, off, n) in enumerate(spans):
        ph = placeholder[r, off : off + n].nonzero()[:, 0]
        vis = per_sample[j]
        given = int(query_positions[j]) if query_positions is not None else None
        if ph.numel() > 1:
            raise ValueError(f"packed sample {j} holds {ph.numel()} placeholder tokens; at most one per sample")
        if ph.numel() == 0:
            if vis is not None and vis.shape[0] > 0:
                raise ValueError(f"packed sample {j} has visual input but no placeholder token")
            pieces.append(text[r, off : off + n])
            if labels is not None:
                labs.append(labels[r, off : off + n])
            seg.vis_starts.append(pos)
            seg.vis_counts.append(0)
            length = n
        else:
            if vis is None:
                raise ValueError(f"packed sample {j} has a placeholder token but no visual input")
            p, v = int(ph[0]), vis.shape[0]
            pieces += [text[r, off : off + p], vis.to(text.dtype), text[r, off + p + 1 : off + n]]
            if labels is not None:
                labs += [labels[r, off : off + p], labels.new_full((v,), IGNORE_INDEX), labels[r, off + p + 1 : off + n]]
            seg.vis_starts.append(pos + p)
            seg.vis_counts.append(v)
            length = n - 1 + v
            if given is not None and given > p:
                given += v - 1
        seg.starts.append(pos)
        seg.lengths.append(length)
        seg.queries.append([pos + given] if given is not None else [])
        pos += length
    seg.originals = list(seg.vis_counts)
    hidden = torch.cat(pieces, 0)[None]
    flat_labels = None
    if labels is not None:
        flat_labels = torch.cat(labs, 0)[None]
    if query_positions is None:
        seg.queries = [_queries(flat_labels[0] if flat_labels is not None else None, s, n, None)
                       for s, n in zip(seg.starts, seg.lengths)]  # fmt: skip
    if flat_labels is not None:
        flat_labels = _ignore_first(flat_labels, seg)
    return hidden, flat_labels, seg


def _ignore_first(labels: torch.Tensor, seg: Segments) -> torch.Tensor:
    first = torch.tensor(seg.starts, device=labels.device)
    return labels.index_fill(1, first, IGNORE_INDEX)


def attention_inputs(model, seg: Segments, hidden: torch.Tensor) -> tuple[object, dict]:
    """The attention mask and extra layer arguments that keep every sample to itself, for the LLM's
    attention implementation."""
    impl = model.language_model.config._attn_implementation or "eager"
    device = hidden.device
    total = seg.total
    if "flash" in impl or impl == VARLEN:
        cu = torch.tensor([0, *torch.tensor(seg.lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        longest = max(seg.lengths)
        return None, dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    ids = seg.segment_ids(device)
    if impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def document_causal(b, h, q, k):
            return (ids[q] == ids[k]) & (k <= q)

        return create_block_mask(document_causal, 1, None, total, total, device=device), {}
    idx = torch.arange(total, device=device)
    allowed = (ids[:, None] == ids[None, :]) & (idx[None, :] <= idx[:, None])
    mask = torch.zeros((1, 1, total, total), dtype=hidden.dtype, device=device)
    return mask.masked_fill_(~allowed[None, None], torch.finfo(hidden.dtype).min), {}


def drop_packed(layer, hidden, positions, labels, seg: Segments, ratio: float, kind: str, position_embeddings,
                compact: bool):  # fmt: skip
    """Keep ``ratio`` of the original visual tokens of every sample before ``layer`` runs; each sample
    selects among its own visual tokens (text-guided: by its own queries). Returns the new hidden
    states, positions, labels and segments."""
    device = hidden.device
    probs, rows = None, []
    if kind == "text":
        # q_proj / k_proj run once per drop point on every rank, whatever the data (ZeRO-3)
        flat = [(q, s) for qs, s in zip(seg.queries, seg.starts) for q in qs] or [(0, 0)]
        q_idx = torch.tensor([q for q, _ in flat], device=device)[None]
        q_start = torch.tensor([s for _, s in flat], device=device)[None]
        key_valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=device)
        probs = text_guided_attention(hidden, layer, position_embeddings, q_idx, key_valid, q_start)[0]  # [Q, T]
    keep, new_counts, first_row = [], [], 0
    for j, (start, length, s, n) in enumerate(zip(seg.starts, seg.lengths, seg.vis_starts, seg.vis_counts)):
        k = min(keep_count(seg.originals[j], ratio), n)
        queries = seg.queries[j]
        if kind == "text" and not queries:
            k, sel = n, torch.arange(n, device=device)  # no answer span to guide it: no drop
        elif kind == "text":
            score = probs[first_row : first_row + len(queries)].mean(0)
            sel = topk_keep(score[s : s + n], k)
        else:
            sel = uniform_keep(n, k, device)
        first_row += len(queries)
        keep.append(torch.cat([torch.arange(start, s, device=device), s + sel,
                               torch.arange(s + n, start + length, device=device)]))  # fmt: skip
        new_counts.append(k)
    index = torch.cat(keep)
    new = Segments([], [len(x) for x in keep], [], new_counts, seg.originals, [])
    at = 0
    for j, length in enumerate(new.lengths):
        new.starts.append(at)
        new.vis_starts.append(at + seg.vis_starts[j] - seg.starts[j])
        dropped = seg.vis_counts[j] - new_counts[j]
        end = seg.vis_starts[j] + seg.vis_counts[j]
        new.queries.append([at + q - seg.starts[j] - (dropped if q >= end else 0) for q in seg.queries[j]])
        at += length
    hidden = hidden[:, index]
    positions = new.positions(device) if compact else positions[:, index]
    if labels is not None:
        labels = _ignore_first(labels[:, index], new)
    return hidden, positions, labels, new


def packed_layers(model, layers, decoder, hidden, labels, seg: Segments, schedule, cache_kw: str):
    """Run the decoder layers over the flat packed sequence with the drop points of ``schedule``."""
    compact = model.config.visual_dropout_position == "compact"
    positions = seg.positions(hidden.device)
    mask, extra = attention_inputs(model, seg, hidden)
    pe = decoder.rotary_emb(hidden, positions)
    for i, layer in enumerate(layers):
        if i in schedule:
            ratio, kind = schedule[i]
            hidden, positions, labels, seg = drop_packed(layer, hidden, positions, labels, seg, ratio, kind, pe, compact)
            mask, extra = attention_inputs(model, seg, hidden)
            pe = decoder.rotary_emb(hidden, positions)
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, use_cache=False,
                       position_embeddings=pe, **{cache_kw: None}, **extra)  # fmt: skip
    return hidden, labels, seg


# --------------------------------------------------------------------------------------------------
# varlen attention (the ``packed_varlen`` implementation)


@lru_cache(maxsize=None)
def _flash_attn_varlen():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # an installed build that does not load (CUDA / torch mismatch)
        return None
    return flash_attn_varlen_func


@lru_cache(maxsize=None)
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    return varlen_attn


@lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def varlen_backend(device: torch.device, head_dim: int = 128) -> str:
    """The kernel :func:`varlen_attention` uses on ``device``: ``flash_attn`` | ``torch_varlen`` |
    ``flex`` (CUDA) or ``sdpa_per_sample`` (elsewhere)."""
    if device.type != "cuda":
        return "sdpa_per_sample"
    if _flash_attn_varlen() is not None:
        return "flash_attn"
    if _torch_varlen() is not None and head_dim <= 256:
        return "torch_varlen"
    return "flex"


def block_diagonal_attention(q, k, v, cu_seqlens, scale):
    """Exact reference: SDPA with a dense block-diagonal causal mask. ``q`` ``[T, H, d]``, ``k, v``
    ``[T, Hkv, d]`` -> ``[T, H, d]``."""
    total = q.shape[0]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=q.device), lengths)
    idx = torch.arange(total, device=q.device)
    allowed = (ids[:, None] == ids[None, :]) & (idx[None, :] <= idx[:, None])
    groups = q.shape[1] // k.shape[1]
    kk, vv = (x.repeat_interleave(groups, dim=1) for x in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk.transpose(0, 1)[None], vv.transpose(0, 1)[None],
                                         attn_mask=allowed, scale=scale)  # fmt: skip
    return out[0].transpose(0, 1)


def per_sample_attention(q, k, v, cu_seqlens, scale):
    """Causal SDPA on each sample by itself (exact, and only the blocks on the diagonal are
    computed: the CPU kernel); the layout of :func:`block_diagonal_attention`."""
    groups = q.shape[1] // k.shape[1]
    out = []
    for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        qs, ks, vs = (x[s:e].transpose(0, 1) for x in (q, k, v))
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, dim=0), vs.repeat_interleave(groups, dim=0)
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(out, 0)


def flex_document_attention(q, k, v, cu_seqlens, scale, compiled: bool = True):
    """FlexAttention with a document mask (samples of ``cu_seqlens``, causal inside each); the same
    layout as :func:`block_diagonal_attention`. ``compiled=False`` runs FlexAttention's eager
    reference (CPU, forward only)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    total = q.shape[0]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=q.device), lengths)

    def document_causal(b, h, qi, ki):
        return (ids[qi] == ids[ki]) & (ki <= qi)

    mask = create_block_mask(document_causal, 1, None, total, total, device=q.device)
    fn = _compiled_flex() if compiled else flex_attention
    out = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=mask,
             scale=scale, enable_gqa=q.shape[1] != k.shape[1])  # fmt: skip
    return out[0].transpose(0, 1)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):  # fmt: skip
    """An attention function of ``transformers.AttentionInterface`` (``packed_varlen``).

    With ``cu_seq_lens_q`` (a packed sequence, batch 1) every sample attends causally to itself
    only, by the kernel of :func:`varlen_backend`; without them, transformers' SDPA function runs
    with ``attention_mask`` as given. Returns ``[B, L, H, d]`` as every such function does."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    if query.shape[0] != 1:
        raise ValueError(f"varlen attention takes one flat packed sequence, got a batch of {query.shape[0]}")
    if dropout:
        raise ValueError("packed_varlen attention has no attention dropout")
    cu = cu_seq_lens_q
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, d]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    backend = varlen_backend(q.device, q.shape[-1])
    longest = int(max_length_q) if max_length_q is not None else int((cu[1:] - cu[:-1]).max())
    if backend == "flash_attn":
        out = _flash_attn_varlen()(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                                   max_seqlen_k=longest, softmax_scale=scale, causal=True)  # fmt: skip
    elif backend == "torch_varlen":
        out = _torch_varlen()(q, k, v, cu, cu, longest, longest, scale=scale, window_size=(-1, 0),
                              enable_gqa=q.shape[1] != k.shape[1])  # fmt: skip
    elif backend == "flex":
        out = flex_document_attention(q, k, v, cu, scale)
    else:
        out = per_sample_attention(q, k, v, cu, scale)
    return out[None], None


AttentionInterface.register(VARLEN, varlen_attention)
