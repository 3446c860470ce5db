"""Chunked prefill of a long video with a pluggable KV-compression policy, and decoding on the result.

The engine runs the decoder layers of a transformers LLM itself (as ``modeling_videoflash`` does),
one *segment* at a time, with a :class:`~.kv_compression.CompressedCache` that the layers grow
through the ordinary Cache API:

1. the text before the video (system prompt) is prefilled as it is;
2. the visual tokens follow in chunks of ``chunk_frames`` frames (default 32). A policy may append a
   *guide* (the question, or its last ``max_guide_length`` tokens, placed right after the chunk) and
   read the queries and keys of every layer; after the chunk, the guide's KV is removed and the
   policy shrinks the chunk's KV layer by layer (:class:`AdaReTaKe`), or files two compressed copies
   of it in host memory (:class:`VideoX2L`);
3. the text after the video (the question) is prefilled on the compressed cache, and tokens are
   decoded on it (greedy, or sampled with temperature / top-k / top-p), streamed if asked.

Each layer's cache may hold a different number of tokens, so the engine builds each layer's mask
from that layer's own length (bottom-right causal: a chunk sees all it keeps of the past);
flash-attention's own causal alignment is already bottom-right. Progressive visual dropout (the
VideoFlash config's schedule) is applied inside every chunk; RoPE is the model's own rotary
embedding, so YaRN applies as configured. Positions are those of the uncompressed sequence
(``positions="keep"``) or, for AdaReTaKe's ``"reforge"``, each chunk's span is compressed by the
global ratio and its kept keys are re-rotated (A.6 of ../shared/reference/kv_compression.md).

Two adapters turn a prompt into the engine's :class:`LongVideoInput`: :func:`videoflash_input`
(a VideoFlash model, visual tokens spliced at the placeholder, 1-D RoPE) and :func:`qwen2_vl_input`
(a stock transformers Qwen2-VL / Qwen2.5-VL, M-RoPE ids from the model's ``get_rope_index``).

This file is copied into every exported checkpoint: it imports only torch, transformers and its
siblings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .kv_compression import (
    CompressedCache,
    chunk_relevance,
    compress_positions,
    frame_distance_ratios,
    key_norm_scores,
    layer_ratios,
    pool_kv,
    prompt_scores,
    rerotate,
    self_scores,
    temporal_ratios,
    topk_sorted,
)
from .visual_dropout import keep_count, text_guided_scores, topk_keep, uniform_keep

__all__ = [
    "LongVideoInput",
    "Decoder",
    "AdaReTaKe",
    "VideoX2L",
    "ChunkedPrefillEngine",
    "make_policy",
    "videoflash_input",
    "qwen2_vl_input",
]


# --------------------------------------------------------------------------------------------------
# what the engine runs on
# --------------------------------------------------------------------------------------------------


@dataclass
class LongVideoInput:
    """One prompt with one video, in the LLM's input space (batch of one).

    ``positions`` ``[R, L]`` are the RoPE ids of the uncompressed sequence (R = 1 for plain RoPE,
    3 for M-RoPE's temporal/height/width rows); the video spans tokens ``[video_start, video_end)``
    in frames of ``frame_tokens`` tokens, ``chunk_tokens`` of them per chunk."""

    embeds: torch.Tensor
    positions: torch.Tensor
    video_start: int
    video_end: int
    chunk_tokens: int
    frame_tokens: int

    def chunks(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.chunk_tokens, self.video_end))
                for s in range(self.video_start, self.video_end, self.chunk_tokens)]


@dataclass
class Decoder:
    """The parts of a transformers LLM the engine calls: its embeddings, decoder layers, rotary
    embedding, final norm and LM head, plus an optional visual-dropout schedule
    ``{layer: (keep ratio of the original, "uniform" | "text")}`` and its position mode."""

    embed: torch.nn.Module
    model: torch.nn.Module  # has .layers, .rotary_emb, .norm
    lm_head: torch.nn.Module
    cache_kwarg: str = "cache"
    dropout: dict = field(default_factory=dict)
    dropout_position: str = "compact"

    @property
    def layers(self):
        return self.model.layers

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor):
        """``(cos, sin)`` ``[1, n, d]`` at positions ``[R, n]``."""
        ids = positions[0][None] if positions.shape[0] == 1 else positions[:, None, :]
        return self.model.rotary_emb(hidden, ids)

    def mask(self, q_len: int, past: int, dtype) -> torch.Tensor | None:
        """The attention mask of ``q_len`` new tokens over ``past`` cached ones (batch of one)."""
        impl = self.model.config._attn_implementation or "eager"
        if "flash" in impl or q_len == 1 or (impl == "sdpa" and past == 0):
            return None
        rows = torch.arange(q_len)[:, None] + past
        blocked = torch.arange(past + q_len)[None, :] > rows
        device = self.lm_head.weight.device
        return torch.zeros(q_len, past + q_len, dtype=dtype).masked_fill_(blocked, torch.finfo(dtype).min)[
            None, None].to(device)


def _queries(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The queries ``[H, n, d]`` after RoPE that ``layer``'s attention computes from ``hidden``
    ``[1, n, D]`` (the same projections, the same rotation)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(1, x.shape[1], -1, attn.head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    q = q.transpose(1, 2)
    half = q.shape[-1] // 2
    rotated = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
    return (q * cos[:, None] + rotated * sin[:, None])[0]


# --------------------------------------------------------------------------------------------------
# policies
# --------------------------------------------------------------------------------------------------


@dataclass
class _ChunkLayer:
    """What a policy sees of one layer after a chunk ran: the chunk's span in that layer's cache,
    its visual positions ``[R, n]`` and, when asked for, the queries of the guide or the chunk."""

    start: int
    length: int
    positions: torch.Tensor
    queries: torch.Tensor | None = None


class AdaReTaKe:
    """AdaReTaKe (A.1-A.6): each chunk keeps the tokens its question attends to most.

    Args:
        budget: tokens of context (``max_input_length``, 16000 in the paper). With ``L_in`` prompt
            tokens (visual tokens included), the global ratio is ``r = budget / L_in`` when
            ``L_in > budget`` and 1 (nothing dropped) otherwise.
        temporal: ``"chunk"`` (neighbour distance of chunk means, water-filled onto [1e-3, 1]: the
            authors' 2026 code), ``"frame"`` (mean change between adjacent frames inside a chunk:
            the paper's description) or ``"none"``.
        layers: ``"adakv"`` (global top-k across layers, +1 smoothing) or ``"even"``.
        positions: ``"keep"`` or ``"reforge"`` (each chunk's position span compressed by ``r``,
            keys re-rotated).
        max_guide_length: the guide is the text after the video, or its last this many tokens.
    """

    guide = True

    def __init__(self, budget: int = 16000, temporal: str = "chunk", layers: str = "adakv",
                 positions: str = "keep", max_guide_length: int | None = None, chunk_frames: int = 32):
        if temporal not in ("chunk", "frame", "none"):
            raise ValueError(f"AdaReTaKe temporal={temporal!r}: expected chunk, frame or none")
        if layers not in ("adakv", "even"):
            raise ValueError(f"AdaReTaKe layers={layers!r}: expected adakv or even")
        if positions not in ("keep", "reforge"):
            raise ValueError(f"AdaReTaKe positions={positions!r}: expected keep or reforge")
        if int(budget) < 1:
            raise ValueError(f"the KV budget must be a positive number of tokens, got {budget}")
        self.budget, self.temporal, self.layer_mode, self.positions = int(budget), temporal, layers, positions
        self.max_guide_length = max_guide_length
        self.chunk_frames = int(chunk_frames)
        self.ratio = 1.0
        self.chunk_ratios: list[float] = []

    def begin(self, inp: LongVideoInput) -> None:
        total = inp.embeds.shape[1]
        self.ratio = 1.0 if total <= self.budget else self.budget / total
        chunks = inp.chunks()
        if self.ratio >= 1.0 or self.temporal == "none":
            self.chunk_ratios = [self.ratio] * len(chunks)
            return
        visual = inp.embeds[0]
        if self.temporal == "chunk":
            feats = torch.stack([visual[s:e].float().mean(0) for s, e in chunks])
            self.chunk_ratios = temporal_ratios(feats, self.ratio).tolist()
        else:
            n = inp.frame_tokens
            frames = [visual[s:e][: (e - s) // n * n].float().reshape(-1, n, visual.shape[-1]) for s, e in chunks]
            self.chunk_ratios = frame_distance_ratios(frames, self.ratio).tolist()

    def compress(self, engine, cache: CompressedCache, chunk: int, layers: list[_ChunkLayer]) -> None:
        r = self.chunk_ratios[chunk]
        if r >= 1.0 or not layers[0].length:  # (visual dropout may leave a short chunk without tokens)
            return
        scores = []
        for i, info in enumerate(layers):
            keys, _ = cache.tail(i, info.start, info.length)
            scores.append(prompt_scores(info.queries, keys))
        ratios = [r] * len(layers)
        if self.layer_mode == "adakv":
            by_length: dict[int, list[int]] = {}
            for i, info in enumerate(layers):
                if info.length:
                    by_length.setdefault(info.length, []).append(i)
            for members in by_length.values():  # layers after a visual-dropout point hold fewer tokens
                for i, x in zip(members, layer_ratios(torch.stack([scores[i] for i in members]), r).tolist()):
                    ratios[i] = x
        for i, info in enumerate(layers):
            if not info.length:
                continue
            keep = min(info.length, max(1, int(ratios[i] * info.length)))
            index = topk_sorted(scores[i], keep)
            keys = None
            if self.positions == "reforge":
                keys = engine.reforged_keys(cache, i, info, index, self.ratio)
            cache.keep(i, info.start, info.length, index, keys)
        if self.positions == "reforge":
            engine.shift_after_reforge(layers, self.ratio)


@dataclass
class _ChunkStore:
    """Video-X²L's two KVs of one chunk, per layer, in host memory, and the mean key of each layer
    (on the device, for the relevance of the chunk to a question)."""

    low: list[tuple[torch.Tensor, torch.Tensor]]
    high: list[tuple[torch.Tensor, torch.Tensor]]
    mean_keys: list[torch.Tensor]


@dataclass
class VideoX2LStore:
    """A question-independent prefill: the system prompt's KV (device) and the chunks' stores."""

    system: list[tuple[torch.Tensor, torch.Tensor]]
    chunks: list[_ChunkStore]
    offsets: list[int]
    video_end: int

    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for c in self.chunks for kv in c.low + c.high for t in kv)


class VideoX2L:
    """Video-X²L (B.0-B.7), training-free: every chunk gets an L-KV (the top ``1/alpha_low`` of its
    tokens by ``score``: ``"attention"`` of the chunk onto itself, or ``"keynorm"``) and an H-KV
    (its KV mean-pooled at stride ``alpha_high``), both kept in host memory (pinned on CUDA) and
    reusable for every question about the same video. While the video is prefilled, later chunks
    attend to the L-KV of earlier ones (``prefill_past="low"``; the device then holds
    ``n / alpha_low`` tokens) or to their H-KV (``"high"``: ``n / alpha_high``, for the longest
    videos). The reference runs the prefill twice, once per ratio, each seeing its own kind of
    past; one pass is half the cost. For a question, every layer ranks the chunks by
    :func:`~.kv_compression.chunk_relevance` of the question's queries and the chunk's keys; the
    ``top_k`` best and the first and last chunk are loaded as L-KV, the others as H-KV, in temporal
    order. Positions are those of the uncompressed sequence (pooled tokens: the floor of their mean)."""

    guide = False

    def __init__(self, alpha_low: int = 2, alpha_high: int = 32, top_k: int = 3, score: str = "attention",
                 chunk_frames: int = 32, prefill_past: str = "low"):
        if score not in ("attention", "keynorm"):
            raise ValueError(f"VideoX2L score={score!r}: expected attention or keynorm")
        if prefill_past not in ("low", "high"):
            raise ValueError(f"VideoX2L prefill_past={prefill_past!r}: expected low or high")
        self.prefill_past = prefill_past
        if int(alpha_low) < 1 or int(alpha_high) < 1 or int(top_k) < 0:
            raise ValueError("VideoX2L needs alpha_low >= 1, alpha_high >= 1 and top_k >= 0")
        self.alpha_low, self.alpha_high, self.top_k, self.score = int(alpha_low), int(alpha_high), int(top_k), score
        self.chunk_frames = int(chunk_frames)
        self.selected: list[list[int]] = []  # per layer, the chunks loaded as L-KV for the last question

    def begin(self, inp: LongVideoInput) -> None:
        pass

    def split(self, engine, cache: CompressedCache, layers: list[_ChunkLayer]) -> _ChunkStore:
        low, high, means = [], [], []
        host = torch.device("cpu")
        pin = cache.layers[0].keys.device.type == "cuda"
        for i, info in enumerate(layers):
            keys, values = cache.tail(i, info.start, info.length)
            means.append(keys.float().mean(1))
            if self.score == "attention":
                scores = self_scores(info.queries, keys)
            else:
                scores = key_norm_scores(keys)
            index = topk_sorted(scores, -(-info.length // self.alpha_low))
            pk, pv = engine.pooled(cache, i, info, self.alpha_high)
            pair = [(keys.index_select(1, index), values.index_select(1, index)), (pk, pv)]
            pair = [tuple(t.to(host).pin_memory() if pin else t.to(host, copy=True) for t in kv) for kv in pair]
            low.append(pair[0])
            high.append(pair[1])
            if self.prefill_past == "low":
                cache.keep(i, info.start, info.length, index)
            else:
                cache.put(i, info.start, pk, pv)
        return _ChunkStore(low, high, means)

    def choose(self, store: VideoX2LStore, q: torch.Tensor, layer_idx: int) -> list[int]:
        m = len(store.chunks)
        rel = chunk_relevance(q, [c.mean_keys[layer_idx][:, None] for c in store.chunks])
        chosen = set(torch.topk(rel, min(self.top_k, m)).indices.tolist()) | {0, m - 1}
        return sorted(chosen)

    def assemble(self, store: VideoX2LStore, layer_idx: int, chosen: list[int], device):
        ks, vs = [store.system[layer_idx][0]], [store.system[layer_idx][1]]
        for j, c in enumerate(store.chunks):
            k, v = (c.low if j in chosen else c.high)[layer_idx]
            ks.append(k.to(device, non_blocking=True))
            vs.append(v.to(device, non_blocking=True))
        return torch.cat(ks, 1)[None], torch.cat(vs, 1)[None]


def make_policy(spec, budget: int | None = None, chunk_frames: int | None = None, **options):
    """A policy from ``spec``: an AdaReTaKe / VideoX2L object (returned as is), ``"adaretake"``
    (``budget`` tokens, default 16000) or ``"videox2l"`` (alias ``"x2l"``); ``options`` go to its
    constructor (e.g. ``temporal``, ``positions``, ``top_k``)."""
    if isinstance(spec, (AdaReTaKe, VideoX2L)):
        return spec
    name = str(spec).strip().lower().replace("-", "").replace("_", "")
    if chunk_frames is not None:
        options["chunk_frames"] = chunk_frames
    if name == "adaretake":
        return AdaReTaKe(budget=16000 if budget is None else budget, **options)
    if name in ("videox2l", "x2l", "videox²l"):
        if budget is not None:
            raise ValueError("Video-X²L has no token budget: it keeps 1/alpha_low and 1/alpha_high of each chunk")
        return VideoX2L(**options)
    raise ValueError(f"kv_compression={spec!r}: expected 'adaretake', 'videox2l' or a policy object")


# --------------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------------


class ChunkedPrefillEngine:
    """Prefill ``inp`` in chunks under ``policy`` and decode on the compressed cache (batch of one).

    ``offsets[k]`` is what the uncompressed positions gain at dropout stage ``k`` (stage 0 is
    before the first drop point): compact visual dropout and reforge move later tokens down."""

    def __init__(self, decoder: Decoder, policy):
        self.decoder = decoder
        self.policy = policy
        layers = list(decoder.layers)
        self.stage_of_layer = []
        stage = 0
        for i in range(len(layers)):
            if i in decoder.dropout and i > 0:
                stage += 1
            self.stage_of_layer.append(stage)
        self.num_stages = stage + 1
        self.offsets = [0] * self.num_stages
        self.cache: CompressedCache | None = None

    # -- running segments ---------------------------------------------------------------------------
    def _run(self, hidden, positions, visual: int, original_visual: int, guide: int = 0, want=None, before=None):
        """Run ``hidden`` ``[1, n, D]`` (its first ``visual`` tokens visual, its last ``guide`` tokens
        a guide) at stage-0 positions ``positions`` ``[R, n]`` through every layer, applying visual
        dropout. ``want``: ``"guide"`` / ``"chunk"`` / ``"all"`` -- whose queries to record per layer;
        ``before(i, q)`` is called before layer i runs. Returns the last hidden state and, per
        layer, a :class:`_ChunkLayer` of the visual part."""
        dec = self.decoder
        cache = self.cache
        infos = []
        pos = positions
        dtype = hidden.dtype
        stage = 0
        cos, sin = dec.rotary(hidden, pos)
        index0 = torch.arange(hidden.shape[1], device=hidden.device)  # tokens present, as stage-0 indices
        for i, layer in enumerate(dec.layers):
            if self.stage_of_layer[i] != stage:
                stage = self.stage_of_layer[i]
                keep = self._drop(i, layer, hidden, visual, original_visual, guide, (cos, sin))
                if keep is not None:
                    hidden, index0 = hidden[:, keep], index0[keep]
                    visual = int((keep < visual).sum())
                pos = self._stage_positions(positions, index0, stage)
                cos, sin = dec.rotary(hidden, pos)
            q = None
            if want is not None:
                rows = {"guide": slice(hidden.shape[1] - guide, None), "chunk": slice(0, visual),
                        "all": slice(0, None)}[want]
                q = _queries(layer, hidden[:, rows], cos[:, rows], sin[:, rows])
            if before is not None:
                before(i, q)
            past = cache.layer_length(i)
            mask = dec.mask(hidden.shape[1], past, dtype)
            hidden = layer(hidden, attention_mask=mask, position_ids=None, use_cache=True,
                           position_embeddings=(cos, sin), **{dec.cache_kwarg: cache})
            infos.append(_ChunkLayer(past, visual, pos[:, :visual], q))
        return hidden, infos

    def _drop(self, i, layer, hidden, visual, original_visual, guide, pe):
        """Visual dropout before layer ``i`` (the first of a stage): indices of the tokens to keep
        (None: all), the share of the segment's ORIGINAL visual count the schedule says, uniformly
        or by the attention of the last guide token (the last prompt token)."""
        if not visual:
            return None
        ratio, kind = self.decoder.dropout[i]
        n = hidden.shape[1]
        device = hidden.device
        k = min(keep_count(original_visual, ratio), visual)
        if kind == "text":
            if not guide:
                raise ValueError("text-guided visual dropout needs the question while the video is prefilled; "
                                 "Video-X²L's prefill is question-independent: use uniform dropout")
            scores = text_guided_scores(hidden, layer, pe, torch.tensor([[n - 1]], device=device),
                                        torch.ones(1, 1, dtype=torch.bool, device=device),
                                        torch.ones(1, n, dtype=torch.bool, device=device))
            sel = topk_keep(scores[0, :visual], k)
        else:
            sel = uniform_keep(visual, k, device)
        return torch.cat([sel.to(device), torch.arange(visual, n, device=device)])

    def _stage_positions(self, stage0_pos, index0, stage):
        """Positions at ``stage`` of the tokens present (``index0`` into the segment): renumbered
        after the stage's past (compact) or the stage-0 ones (keep), moved by the stage's offset."""
        if self.decoder.dropout_position == "compact":
            start = int(stage0_pos[0, 0]) - self.offsets[0] + self.offsets[stage]
            return (start + torch.arange(index0.numel(), device=stage0_pos.device))[None].expand(
                stage0_pos.shape[0], -1)
        return stage0_pos[:, index0] + (self.offsets[stage] - self.offsets[0])

    def _first_layer(self, stage: int) -> int:
        return self.stage_of_layer.index(stage)

    def _segment_positions(self, positions):
        return positions + self.offsets[0]

    def _after_segment(self, infos, original_visual: int) -> None:
        """Compact dropout: later tokens of each stage move down by what this segment dropped there."""
        if self.decoder.dropout_position != "compact":
            return
        for stage in range(1, self.num_stages):
            self.offsets[stage] -= original_visual - infos[self._first_layer(stage)].length

    # -- positions for reforge and pooling -----------------------------------------------------------
    def _rope(self, cache: CompressedCache, positions: torch.Tensor):
        cos, sin = self.decoder.rotary(cache.layers[0].keys, positions)
        return cos[0], sin[0]

    def reforged_keys(self, cache, i, info: _ChunkLayer, index, ratio):
        keys, _ = cache.tail(i, info.start, info.length)
        old = info.positions[:, index.to(info.positions.device)]
        new = old.clone()
        new[0] = compress_positions(old[0], int(info.positions[0, 0]), ratio)
        return rerotate(keys.index_select(1, index), self._rope(cache, old), self._rope(cache, new),
                        self.decoder.model.rotary_emb.attention_scaling)

    def shift_after_reforge(self, layers: list[_ChunkLayer], ratio: float) -> None:
        for stage in range(self.num_stages):
            info = layers[self._first_layer(stage)]
            if not info.length:
                continue
            start, last = int(info.positions[0, 0]), int(info.positions[0].max())
            self.offsets[stage] -= last - int(compress_positions(torch.tensor([last]), start, ratio)[0])

    def pooled(self, cache, i, info: _ChunkLayer, stride: int):
        """The chunk's KV mean-pooled at ``stride``; keys pooled without RoPE and rotated again at
        the floor of their tokens' mean position."""
        keys, values = cache.tail(i, info.start, info.length)
        pos = info.positions
        n = pos.shape[1]
        groups = -(-n // stride)
        sums = torch.zeros(pos.shape[0], groups, dtype=torch.float64, device=pos.device)
        sums.index_add_(1, torch.arange(n, device=pos.device) // stride, pos.double())
        counts = torch.bincount(torch.arange(n, device=pos.device) // stride, minlength=groups)
        pooled_pos = torch.floor(sums / counts).long()
        scaling = self.decoder.model.rotary_emb.attention_scaling
        cos, sin = self._rope(cache, pos)

        def unrotated(count):  # the (cos, sin) of no rotation, mscale kept
            return cos.new_full((count, cos.shape[-1]), scaling), sin.new_zeros(count, sin.shape[-1])

        plain = rerotate(keys, (cos, sin), unrotated(n), scaling)
        back = rerotate(pool_kv(plain, stride), unrotated(groups), self._rope(cache, pooled_pos), scaling)
        return back, pool_kv(values, stride)

    # -- the prefill -----------------------------------------------------------------------------------
    def _guide(self, inp: LongVideoInput):
        tail = inp.embeds[:, inp.video_end:]
        tail_pos = inp.positions[:, inp.video_end:]
        limit = getattr(self.policy, "max_guide_length", None)
        if limit:
            tail, tail_pos = tail[:, -int(limit):], tail_pos[:, -int(limit):]
        return tail, tail_pos

    def _prefix(self, inp: LongVideoInput) -> None:
        self.cache = CompressedCache(len(self.decoder.layers))
        self.offsets = [0] * self.num_stages
        self.policy.begin(inp)
        s = inp.video_start
        if s:
            _, infos = self._run(inp.embeds[:, :s], self._segment_positions(inp.positions[:, :s]), 0, 0)
            self._after_segment(infos, 0)

    def _video(self, inp: LongVideoInput, on_chunk) -> None:
        guide, guide_pos = self._guide(inp) if self.policy.guide else (None, None)
        want = "guide" if self.policy.guide else ("chunk" if getattr(self.policy, "score", None) == "attention" else None)
        for c, (s, e) in enumerate(inp.chunks()):
            n = e - s
            hidden = inp.embeds[:, s:e]
            pos = self._segment_positions(inp.positions[:, s:e])
            g = 0
            if guide is not None:
                g = guide.shape[1]
                hidden = torch.cat([hidden, guide], 1)
                pos = torch.cat([pos, guide_pos - guide_pos.min() + pos.max() + 1], 1)
            _, infos = self._run(hidden, pos, n, n, guide=g, want=want)
            for i in range(len(infos)):
                self.cache.drop_last(i, g)
            self._after_segment(infos, n)
            on_chunk(c, infos)

    def _question(self, inp: LongVideoInput, start: int, before=None, want=None) -> torch.Tensor:
        hidden, _ = self._run(inp.embeds[:, start:], self._segment_positions(inp.positions[:, start:]), 0, 0,
                              want=want, before=before)
        self._next_position = int(inp.positions.max()) + 1
        self._rows = inp.positions.shape[0]
        return self.decoder.lm_head(self.decoder.model.norm(hidden[:, -1:]))[0, -1]

    @torch.no_grad()
    def prefill(self, inp: LongVideoInput) -> torch.Tensor:
        """AdaReTaKe-style prefill of the whole prompt; returns the last token's logits."""
        if not isinstance(self.policy, AdaReTaKe):
            raise TypeError("prefill() runs question-guided policies; use prefill_video()/answer() for Video-X²L")
        if inp.video_end >= inp.embeds.shape[1]:
            raise ValueError("the prompt needs text after the video (the question) to guide the compression")
        self._prefix(inp)
        self._video(inp, lambda c, infos: self.policy.compress(self, self.cache, c, infos))
        return self._question(inp, inp.video_end)

    @torch.no_grad()
    def prefill_video(self, inp: LongVideoInput) -> VideoX2LStore:
        """Video-X²L's question-independent prefill of the system prompt and the video."""
        if inp.video_start == 0:
            raise ValueError("Video-X²L needs text before the video (the system prompt) in the prompt")
        self._prefix(inp)
        system = [tuple(t.clone() for t in self.cache.tail(i, 0, self.cache.layer_length(i)))
                  for i in range(len(self.decoder.layers))]
        stores = []
        self._video(inp, lambda c, infos: stores.append(self.policy.split(self, self.cache, infos)))
        return VideoX2LStore(system, stores, list(self.offsets), inp.video_end)

    @torch.no_grad()
    def answer(self, store: VideoX2LStore, inp: LongVideoInput) -> torch.Tensor:
        """Prefill the text after the video of ``inp`` on the chunks each layer finds relevant."""
        if inp.video_end != store.video_end:
            raise ValueError(f"this prompt's video ends at token {inp.video_end}, the stored prefill's at "
                             f"{store.video_end}: not the same system prompt and video")
        self.cache = CompressedCache(len(self.decoder.layers))
        self.offsets = list(store.offsets)
        policy = self.policy
        policy.selected = []
        device = inp.embeds.device

        def load(i, q):
            chosen = policy.choose(store, q, i)
            policy.selected.append(chosen)
            self.cache.replace(i, *policy.assemble(store, i, chosen, device))

        return self._question(inp, store.video_end, before=load, want="all")

    # -- decoding ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        """Feed one token; the next token's logits."""
        dec = self.decoder
        device = dec.lm_head.weight.device
        hidden = dec.embed(torch.tensor([[token]], device=device))
        stage = -1
        cos = sin = None
        for i, layer in enumerate(dec.layers):
            if self.stage_of_layer[i] != stage:
                stage = self.stage_of_layer[i]
                pos = torch.full((self._rows, 1), self._next_position + self.offsets[stage], device=device)
                cos, sin = dec.rotary(hidden, pos)
            hidden = layer(hidden, attention_mask=None, position_ids=None, use_cache=True,
                           position_embeddings=(cos, sin), **{dec.cache_kwarg: self.cache})
        self._next_position += 1
        return dec.lm_head(dec.model.norm(hidden))[0, -1]

    def generate(self, logits: torch.Tensor, max_new_tokens: int = 512, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0, eos_token_id=None,
                 streamer=None, prompt_ids: torch.Tensor | None = None, generator=None) -> list[int]:
        """Decode from the prefill's last ``logits``: greedy, or sampled with temperature / top-k /
        top-p (transformers' logits warpers); stops after ``max_new_tokens`` or at ``eos_token_id``."""
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        warpers = LogitsProcessorList()
        if do_sample:
            if temperature and temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(float(temperature)))
            if top_k:
                warpers.append(TopKLogitsWarper(int(top_k)))
            if top_p is not None and top_p < 1.0:
                warpers.append(TopPLogitsWarper(float(top_p)))
        if streamer is not None and prompt_ids is not None:
            streamer.put(prompt_ids.cpu())
        out: list[int] = []
        seen = prompt_ids.to(logits.device) if prompt_ids is not None else torch.zeros(1, 0, dtype=torch.long)
        for _ in range(int(max_new_tokens)):
            scores = logits.float()[None]
            if do_sample:
                scores = warpers(seen, scores)
                token = int(torch.multinomial(scores.softmax(-1), 1, generator=generator)[0, 0])
            else:
                token = int(scores.argmax(-1)[0])
            out.append(token)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if token in eos or len(out) == int(max_new_tokens):
                break
            seen = torch.cat([seen, torch.tensor([[token]], device=seen.device)], 1)
            logits = self.step(token)
        if streamer is not None:
            streamer.end()
        return out


# --------------------------------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------------------------------


def _frames_to_tokens(chunk_frames: int, frames_per_unit: int, tokens_per_unit: int) -> int:
    units = max(1, int(chunk_frames) // frames_per_unit)
    return units * tokens_per_unit


def videoflash_input(model, input_ids: torch.Tensor, video_embeds: torch.Tensor, chunk_frames: int = 32):
    """(``LongVideoInput``, ``Decoder``) of a VideoFlash prompt: ``input_ids`` ``[1, L]`` with one
    ``<image>`` placeholder and the video's visual tokens (``encode_video_chunked``); chunks hold
    ``chunk_frames`` frames (whole clips). The decoder carries the config's inference dropout."""
    from .modeling_videoflash import _layer_cache_kwarg

    if input_ids.shape[0] != 1:
        raise ValueError("chunked prefill runs one conversation at a time (batch of one)")
    ids = input_ids.to(video_embeds.device)
    hidden, _, _, starts, counts, _, _ = model._splice(ids, torch.ones_like(ids), None, [video_embeds], None, None)
    cfg = model.config
    start, count = int(starts[0]), int(counts[0])
    inp = LongVideoInput(
        embeds=hidden, positions=torch.arange(hidden.shape[1], device=hidden.device)[None],
        video_start=start, video_end=start + count,
        chunk_tokens=_frames_to_tokens(chunk_frames, cfg.frames_per_clip, cfg.tokens_per_clip),
        frame_tokens=cfg.tokens_per_clip,
    )
    layers = model.get_decoder().layers
    dec = Decoder(model.get_input_embeddings(), model.get_decoder(), model.get_output_embeddings(),
                  _layer_cache_kwarg(type(layers[0])), model._dropout_schedule(), cfg.visual_dropout_position)
    return inp, dec


def qwen2_vl_input(model, input_ids: torch.Tensor, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor,
                   chunk_frames: int = 32, second_per_grid_ts=None):
    """(``LongVideoInput``, ``Decoder``) of a stock transformers Qwen2-VL / Qwen2.5-VL prompt (the
    processor's ``input_ids`` with the video's placeholder tokens, ``pixel_values_videos``,
    ``video_grid_thw``): visual features from the model's ``get_video_features``, M-RoPE ids from its
    ``get_rope_index``; chunks of ``chunk_frames`` frames (``temporal_patch_size`` frames per grid)."""
    import inspect

    from .modeling_videoflash import _layer_cache_kwarg

    inner = model.model
    cfg = model.config
    if input_ids.shape[0] != 1 or video_grid_thw.shape[0] != 1:
        raise ValueError("chunked prefill runs one conversation with one video at a time")
    device = model.lm_head.weight.device
    ids = input_ids.to(device)
    embeds = model.get_input_embeddings()(ids)
    feats = inner.get_video_features(pixel_values_videos.to(device), video_grid_thw.to(device)).pooler_output
    feats = torch.cat(list(feats)).to(embeds.dtype)
    is_video = ids[0] == cfg.video_token_id
    where = is_video.nonzero()[:, 0]
    if where.numel() != feats.shape[0] or where.numel() == 0:
        raise ValueError(f"the prompt holds {where.numel()} video tokens for {feats.shape[0]} video features")
    start, end = int(where[0]), int(where[-1]) + 1
    if end - start != where.numel():
        raise ValueError("the video tokens must form one run")
    embeds = embeds.clone()
    embeds[0, start:end] = feats
    types = is_video.long()[None] * 2
    kwargs = {}
    params = inspect.signature(inner.get_rope_index).parameters
    if "mm_token_type_ids" in params:
        kwargs["mm_token_type_ids"] = types
    if second_per_grid_ts is not None and "second_per_grid_ts" in params:
        kwargs["second_per_grid_ts"] = second_per_grid_ts
    positions, _ = inner.get_rope_index(ids, video_grid_thw=video_grid_thw.to(device), **kwargs)
    t, h, w = (int(x) for x in video_grid_thw[0])
    merge = cfg.vision_config.spatial_merge_size
    per_grid = h * w // (merge * merge)
    tps = getattr(cfg.vision_config, "temporal_patch_size", 2)
    inp = LongVideoInput(embeds=embeds, positions=positions[:, 0], video_start=start, video_end=end,
                         chunk_tokens=_frames_to_tokens(chunk_frames, tps, per_grid), frame_tokens=per_grid)
    text = inner.language_model
    return inp, Decoder(model.get_input_embeddings(), text, model.lm_head, _layer_cache_kwarg(type(text.layers[0])))
