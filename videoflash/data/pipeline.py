"""The streaming loader: WebDataset shards -> token-budget batches, with exact resume.

Per rank, the loader runs ``W = max(1, num_workers)`` *streams*, one per DataLoader worker; over all
ranks there are ``S = world_size * W`` streams, stream ``g = rank * W + w``. A stream is a pure
function of ``(seed, epoch, g)`` and the shard files:

1. **Shards per source.** Each source's brace-expanded shard list is an infinite sequence of passes.
   ``shard_mode="partitioned"`` (default): pass ``p`` is a permutation of the shards seeded by
   ``(seed, epoch, source, p)`` that every stream computes alike, and stream ``g`` reads the shards at
   positions ``g, g+S, g+2S, ...`` of it (with fewer shards than streams, every stream reads every
   shard and keeps the samples ``j`` with ``j % S == g``), so within a pass the streams see disjoint
   samples. ``shard_mode="resampled"``: open_clip's resampling, shards drawn with replacement by a
   per-stream generator.
2. **Mixing.** Each next sample comes from source ``i`` with probability proportional to
   ``weight_i * num_samples_i`` (sizes from the shard index), i.e. with weights 1 the sources mix as
   if concatenated, as LLaVA does; other weights up- or down-sample a source.
3. **Shuffle** of undecoded samples (raw bytes) in a buffer bounded by a sample count and by bytes.
4. **Decode in the worker**: frame indices from the stage's policy, decord at the target size, images,
   the conversation with the placeholder and time message, labels. A sample that fails anywhere is
   logged (rate-limited), counted per reason and per shard, and skipped. Videos are decoded in a
   child process of the stream (:mod:`.isolation`, ``decode_isolation="subprocess"``): a file that
   crashes decord (segfault, abort) or hangs past ``decode_timeout_s`` is skipped as
   ``decoder_crash`` / ``decoder_timeout`` and the child is replaced.
5. **Batches under a token budget**: samples are taken in stream order while
   ``batch_size * longest_sample <= max_tokens_per_batch`` (a sample's length counts its visual tokens,
   ``tokens_per_frame * frames + tokens_per_image * tiles``, plus its text tokens); a batch closes when
   the next sample would break the budget (that sample opens the next batch) or when it reaches
   ``max_batch_size``. A sample longer than ``max_sample_tokens`` is skipped (``too_long``).
6. Every stream yields exactly ``ceil(batches_per_epoch / W)`` batches per epoch, so every rank yields
   the same number of batches (DataLoader workers are served round robin).

**Exact resume.** Each batch carries its stream's position: the number of raw (shuffled, undecoded)
samples consumed before the next batch starts. The main process records, for every stream, the
position and batch count of the last batch it handed out, plus the epoch and the batches handed out
in it. A loader rebuilt with that state regenerates each stream of the epoch, passes over the first
``position`` raw samples without decoding them, and rotates worker ids so that the round robin
continues with the stream that was next. The replay reads (does not decode) the shards already
consumed in the current epoch, which bounds its cost by the epoch size.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .collate import Sample, collate
from .conversation import ConversationTokenizer, normalize_conversation, place_placeholder, time_message
from .decode import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, MediaError, VideoDecoder, decode_image, image_tiles
from .isolation import Isolated, IsolationError
from .sampling import frame_indices, parse_policy, span_to_frames
from .shards import expand_shards, index_path_for, iter_tar_samples

__all__ = [
    "DataSource",
    "LoaderConfig",
    "VideoLoader",
    "build_loader",
    "load_sources",
    "resolve_sources",
    "SkipSample",
]

log = logging.getLogger("videoflash.data")

STATE_VERSION = 1


# --------------------------------------------------------------------------------------------------
# configuration


@dataclass
class DataSource:
    """One shard set in the mix.

    ``shards``: a brace pattern (``/d/k400-{000000..000099}.tar``), several joined by ``::``, a list, or
    a ``{prefix}-index.json`` (every shard it lists).
    ``weight``: multiplies the source's share (its sample count); ``name`` defaults to the shard prefix.
    ``num_samples``: overrides the size read from ``{prefix}-index.json``.
    """

    shards: str | list
    name: str | None = None
    weight: float = 1.0
    num_samples: int | None = None


@dataclass
class LoaderConfig:
    """Everything the loader needs besides the tokenizer, rank and world size.

    Frames and images:
        image_size: the square side of frames and tiles (224 / 448; small for the CPU model).
        frame_policy: ``dynamic_fps1`` | ``middle`` | ``fps:<rate>`` (see :mod:`.sampling`).
        min_frames, max_frames: the stage's frame bounds (``middle`` takes ``max_frames``).
        image_mode: ``square`` (one tile per image) | ``anyres`` (thumbnail + grid for one image).
        max_image_grid: the largest anyres grid side.
    Token accounting (from the model config; never assumed):
        tokens_per_frame: visual tokens per video frame (``tokens_per_clip / frames_per_clip``).
        tokens_per_image: visual tokens per image tile.
    Text:
        conversation_format: ``chatml`` (the tokenizer's chat template) | ``plain`` (stage 1).
        time_message: add "The video lasts for ..." after the placeholder of a video.
        label_quirk: LLaVA-OneVision's extra unmasking (off by default; see :mod:`.conversation`).
    Batching:
        max_tokens_per_batch: budget of ``batch_size * longest sample`` in LLM tokens.
        max_batch_size: samples per batch at most.
        max_sample_tokens: longer samples are skipped (default: ``max_tokens_per_batch``).
        batches_per_epoch: batches per rank per epoch (rounded up to a multiple of the worker count).
    Streaming:
        num_workers: DataLoader workers (= streams per rank); 0 runs one stream in-process.
        seed: the seed of every shard order, mix draw and shuffle.
        shard_mode: ``partitioned`` (disjoint streams within a pass) | ``resampled``.
        shuffle_buffer, shuffle_buffer_bytes: bounds of the undecoded-sample shuffle buffer.
        log_every: log the first bad sample of each reason, then every ``log_every``-th.
        max_consecutive_errors: a stream that meets this many bad samples in a row stops with an error.
    Decoding:
        decode_threads: decord's threads per video.
        decode_isolation: ``subprocess`` (default): each stream decodes its videos in one child
            process, so that a native crash or a hang costs one sample (``decoder_crash``,
            ``decoder_timeout``) instead of the run; ``inline``: in the stream's own process.
        decode_timeout_s: seconds one video may take to decode before its child is killed
            (``subprocess`` only).
    """

    sources: list = field(default_factory=list)
    image_size: int = 224
    frame_policy: str = "dynamic_fps1"
    min_frames: int = 4
    max_frames: int = 512
    local_num_frames: int = 4
    image_mode: str = "square"
    max_image_grid: int = 6
    tokens_per_frame: int = 16
    tokens_per_image: int = 64
    conversation_format: str = "chatml"
    time_message: bool = True
    label_quirk: bool = False
    max_tokens_per_batch: int = 32768
    max_batch_size: int = 64
    max_sample_tokens: int | None = None
    batches_per_epoch: int = 1000
    num_workers: int = 2
    seed: int = 0
    shard_mode: str = "partitioned"
    shuffle_buffer: int = 1000
    shuffle_buffer_bytes: int = 1 << 30
    prefetch_factor: int = 2
    pin_memory: bool = False
    decode_threads: int = 1
    log_every: int = 100
    max_consecutive_errors: int = 1000
    decode_isolation: str = "subprocess"
    decode_timeout_s: float = 120.0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        parse_policy(self.frame_policy)
        pos = (
            "image_size", "max_frames", "local_num_frames", "max_image_grid", "max_tokens_per_batch",
            "max_batch_size", "batches_per_epoch", "shuffle_buffer", "shuffle_buffer_bytes", "log_every",
            "max_consecutive_errors", "decode_threads",
        )  # fmt: skip
        for name in pos:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"LoaderConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("tokens_per_frame", "tokens_per_image", "num_workers", "min_frames"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"LoaderConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.max_frames % self.local_num_frames:
            raise ValueError(f"LoaderConfig.max_frames ({self.max_frames}) must be a multiple of {self.local_num_frames}")
        if self.image_mode not in ("square", "anyres"):
            raise ValueError(f"LoaderConfig.image_mode must be 'square' or 'anyres', got {self.image_mode!r}")
        if self.conversation_format not in ("chatml", "plain"):
            raise ValueError(f"LoaderConfig.conversation_format must be 'chatml' or 'plain', got {self.conversation_format!r}")
        if self.shard_mode not in ("partitioned", "resampled"):
            raise ValueError(f"LoaderConfig.shard_mode must be 'partitioned' or 'resampled', got {self.shard_mode!r}")
        if self.decode_isolation not in ("subprocess", "inline"):
            raise ValueError(
                f"LoaderConfig.decode_isolation must be 'subprocess' or 'inline', got {self.decode_isolation!r}"
            )
        if not float(self.decode_timeout_s) > 0:
            raise ValueError(f"LoaderConfig.decode_timeout_s must be > 0, got {self.decode_timeout_s!r}")
        if not self.sources:
            raise ValueError("LoaderConfig.sources is empty")

    @property
    def sample_token_limit(self) -> int:
        return int(self.max_sample_tokens or self.max_tokens_per_batch)


def load_sources(path: str) -> list[DataSource]:
    """Read a ``sources.yaml`` (as written by ``data_tools.make_shards --mix``); relative shard
    patterns are relative to the file's folder."""
    import yaml

    with open(path) as f:
        doc = yaml.safe_load(f)
    items = doc.get("sources") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a list of sources (or 'sources:' with a list)")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, dict) or "shards" not in it:
            raise ValueError(f"{path}: source {i} needs 'shards'")
        unknown = set(it) - set(DataSource.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: source {i} has unknown keys {sorted(unknown)}")
        src = DataSource(**it)
        pats = src.shards.split("::") if isinstance(src.shards, str) else list(src.shards)
        pats = [p if os.path.isabs(p) or "://" in p or p.startswith("pipe:") else os.path.join(base, p) for p in pats]
        src.shards = "::".join(pats)
        out.append(src)
    return out


@dataclass
class _Resolved:
    """A source ready for the streams: expanded shard urls and its size."""

    name: str
    urls: list
    weight: float
    num_samples: int
    shard_sizes: list = field(default_factory=list)  # samples per url from the index (None: unknown)


def resolve_sources(sources) -> list[_Resolved]:
    """Expand the shard patterns of ``sources`` (a list of :class:`DataSource` / dicts / patterns, or
    a ``sources.yaml`` path) and read their sizes; each result has ``name``, ``urls``, ``weight``,
    ``num_samples``."""
    if isinstance(sources, str):
        sources = load_sources(sources)
    out = []
    for i, s in enumerate(sources):
        if isinstance(s, dict):
            s = DataSource(**s)
        if isinstance(s, str):
            s = DataSource(shards=s)
        urls = _expand_with_index(s.shards)
        size = s.num_samples
        name = s.name
        idx_path = index_path_for(urls)
        per_shard = [None] * len(urls)
        if idx_path is not None:
            sizes = _shard_sizes(idx_path)
            per_shard = [sizes.get(os.path.basename(u)) for u in urls]
            if size is None:
                size = sum(n or 0 for n in per_shard)
            if name is None:
                name = os.path.basename(idx_path)[: -len("-index.json")]
        if size is None:
            log.warning("source %s: no index beside %s; weighting it by its shard count", s.name or i, urls[0])
            size = len(urls)
        if not s.weight >= 0:
            raise ValueError(f"source {name or i}: weight must be >= 0, got {s.weight}")
        out.append(_Resolved(name or f"source{i}", urls, float(s.weight), int(size), per_shard))
    if not any(r.weight * r.num_samples > 0 for r in out):
        raise ValueError("every source has zero weight or zero samples")
    return out




def _expand_with_index(spec) -> list[str]:
    """Brace-expand shard patterns; a ``{prefix}-index.json`` stands for every shard it lists."""
    urls = []
    for u in expand_shards(spec):
        if u.endswith("-index.json"):
            with open(u) as f:
                idx = json.load(f)
            urls.extend(os.path.join(os.path.dirname(u), sh["name"]) for sh in idx.get("shards", []))
        else:
            urls.append(u)
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    return urls


def _shard_sizes(index_path: str) -> dict:
    """``{shard file name: samples}`` from ``{prefix}-index.json`` (only its ``shards`` list is used)."""
    with open(index_path) as f:
        idx = json.load(f)
    return {s["name"]: int(s["num_samples"]) for s in idx.get("shards", [])}


def _seed(*parts) -> int:
    """A 64-bit seed from any parts, identical in every process (unlike ``hash``)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


# --------------------------------------------------------------------------------------------------
# bad samples


class SkipSample(Exception):
    """A sample that is skipped, with a short ``reason`` code for the counters."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class BadSampleCounter:
    """Counts bad samples per reason and per shard; logs the first of each reason, then every N-th."""

    def __init__(self, log_every: int = 100, where: str = ""):
        self.log_every = max(1, int(log_every))
        self.where = where
        self.by_reason: dict[str, int] = {}
        self.by_shard: dict[str, dict[str, int]] = {}
        self.muted = False

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def record(self, reason: str, shard: str, key: str | None, message: str, count: int = 1) -> None:
        if self.muted:
            return
        before = self.by_reason.get(reason, 0)
        n = before + count
        self.by_reason[reason] = n
        per = self.by_shard.setdefault(os.path.basename(shard or "?"), {})
        per[reason] = per.get(reason, 0) + count
        if before == 0 or n // self.log_every > before // self.log_every:
            log.warning("%sskipped sample %s in %s (%s, #%d): %s", self.where, key, shard, reason, n, message)

    def handler(self, shard: str):
        """A webdataset-style handler: count tar read errors of ``shard`` and continue."""

        def handle(exn: Exception) -> bool:
            self.record("tar_error", shard, None, f"{type(exn).__name__}: {str(exn)[:300]}")
            return True

        return handle

    def snapshot(self) -> dict:
        return {"by_reason": dict(self.by_reason), "by_shard": copy.deepcopy(self.by_shard)}

    def load(self, snap: dict | None) -> None:
        snap = snap or {}
        self.by_reason = dict(snap.get("by_reason", {}))
        self.by_shard = copy.deepcopy(snap.get("by_shard", {}))


def _merge_counts(dst: dict, snap: dict) -> dict:
    for r, n in snap.get("by_reason", {}).items():
        dst.setdefault("by_reason", {})[r] = dst.get("by_reason", {}).get(r, 0) + n
    for sh, per in snap.get("by_shard", {}).items():
        d = dst.setdefault("by_shard", {}).setdefault(sh, {})
        for r, n in per.items():
            d[r] = d.get(r, 0) + n
    return dst


# --------------------------------------------------------------------------------------------------
# decoding a video (in the stream's decode child, or inline)


def _decode_video(data: bytes, cfg: LoaderConfig, start, end):
    """The frames a sample's video gives under the stage's policy, and the seconds they span:
    ``(uint8 [N, S, S, 3] array, seconds)``. Raises :class:`MediaError`."""
    dec = VideoDecoder(data, size=cfg.image_size, num_threads=cfg.decode_threads)
    try:
        first, stop = span_to_frames(dec.num_frames, dec.fps, start, end)
        idx = frame_indices(dec.num_frames, dec.fps, cfg.frame_policy, cfg.min_frames, cfg.max_frames,
                            start=start, end=end, local_num_frames=cfg.local_num_frames)  # fmt: skip
    except ValueError as exn:
        raise MediaError("bad_span", str(exn)) from None
    return dec.frames(idx).numpy(), (stop - first) / dec.fps


def _video_decoder(cfg: LoaderConfig, g: int) -> Isolated | None:
    """The decode child of stream ``g`` (started now, before the stream holds any data), or None
    when ``decode_isolation`` is ``inline``."""
    if cfg.decode_isolation == "inline":
        return None
    iso = Isolated(_decode_video, timeout=float(cfg.decode_timeout_s), name=f"decode process of stream {g}")
    iso.start()
    return iso


# --------------------------------------------------------------------------------------------------
# one stream


class _Stream:
    """Stream ``g`` of ``num_streams`` for one epoch, starting after ``position`` raw samples."""

    def __init__(self, cfg: LoaderConfig, sources, tokenizer, logical: int, g: int, num_streams: int,
                 epoch: int, position: int, batches_done: int, batches_target: int, skipped: dict | None):  # fmt: skip
        self.cfg = cfg
        self.sources = sources
        self.tokenizer = tokenizer
        self.logical = logical
        self.g = g
        self.num_streams = num_streams
        self.epoch = epoch
        self.position = int(position)
        self.batches_done = int(batches_done)
        self.batches_target = int(batches_target)
        self.bad = BadSampleCounter(cfg.log_every, where=f"[stream {g} epoch {epoch}] ")
        self.bad.load(skipped)
        self.conv = ConversationTokenizer(tokenizer, cfg.conversation_format, cfg.label_quirk)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.decoder = _video_decoder(cfg, g)

    # -- the raw stream: shards -> samples -> mix -> shuffle (deterministic, no decoding) ---------
    def _read(self, src: _Resolved, u: int, keep=None):
        """Samples of shard ``u`` of ``src`` (those whose index ``j`` in the shard passes ``keep``).

        Python's tarfile ends a damaged tar (bad header, cut short) silently; a shard that yields fewer
        samples than its index lists counts the missing ones (that this stream would have kept) as
        ``missing_in_tar``.
        """
        url = src.urls[u]
        j = 0
        for sample in iter_tar_samples(url, self.bad.handler(url)):
            if keep is None or keep(j):
                yield sample
            j += 1
        self._last_read = j
        expected = src.shard_sizes[u] if u < len(src.shard_sizes) else None
        if expected is not None and j < expected:
            missing = sum(1 for k in range(j, expected) if keep is None or keep(k))
            if missing:
                self.bad.record("missing_in_tar", url, None, f"read {j} of the {expected} samples", count=missing)

    def _source(self, i: int, src: _Resolved):
        cfg, S, g = self.cfg, self.num_streams, self.g
        n = len(src.urls)
        if cfg.shard_mode == "resampled":
            rng = random.Random(_seed(cfg.seed, self.epoch, "resample", i, g))
            while True:
                got = 0
                for _ in range(n):
                    for sample in self._read(src, rng.randrange(n)):
                        got += 1
                        yield sample
                if not got:
                    return
        p = 0
        while True:
            order = list(range(n))
            random.Random(_seed(cfg.seed, self.epoch, "pass", i, p)).shuffle(order)
            got = 0
            if n >= S:
                for u in order[g::S]:
                    for sample in self._read(src, u):
                        got += 1
                        yield sample
            else:
                # every stream reads every shard and keeps the samples j = g, g+S, ... of the pass
                offset = 0
                for u in order:
                    base = offset
                    size = src.shard_sizes[u] if u < len(src.shard_sizes) else None
                    for sample in self._read(src, u, keep=lambda k, base=base: (base + k) % S == g):
                        got += 1
                        yield sample
                    # the next shard's samples continue the count (by the index when it is known, so
                    # that a damaged shard does not shift the split of the following ones)
                    offset += size if size is not None else self._last_read
            if not got:
                return
            p += 1

    def _mixed(self):
        its = [self._source(i, s) for i, s in enumerate(self.sources)]
        weights = [s.weight * s.num_samples for s in self.sources]
        rng = random.Random(_seed(self.cfg.seed, self.epoch, "mix", self.g))
        while True:
            total = sum(weights)
            if total <= 0:
                return
            r = rng.random() * total
            i = 0
            while i < len(weights) - 1 and (r >= weights[i] or weights[i] == 0):
                r -= weights[i]
                i += 1
            try:
                sample = next(its[i])
            except StopIteration:
                if not self.bad.muted:
                    log.warning("stream %d: source %s has no readable sample for this stream; dropped from its mix",
                                self.g, self.sources[i].name)  # fmt: skip
                weights[i] = 0.0
                continue
            sample["__source__"] = i
            yield sample

    def _shuffled(self, samples):
        cfg = self.cfg
        rng = random.Random(_seed(cfg.seed, self.epoch, "shuffle", self.g))
        buf, nbytes = [], 0

        def take():
            nonlocal nbytes
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            s, size = buf.pop()
            nbytes -= size
            return s

        for s in samples:
            size = sum(len(v) for v in s.values() if isinstance(v, (bytes, bytearray)))
            buf.append((s, size))
            nbytes += size
            if len(buf) >= cfg.shuffle_buffer or nbytes >= cfg.shuffle_buffer_bytes:
                yield take()
        while buf:
            yield take()

    def raw(self):
        """``(position, raw sample)`` pairs of the epoch, from position 0."""
        return enumerate(self._shuffled(self._mixed()))

    # -- decoding one sample ----------------------------------------------------------------------
    def prepare(self, raw: dict) -> Sample:
        cfg = self.cfg
        key = raw.get("__key__", "?")
        try:
            rec = json.loads(raw["json"])
            if not isinstance(rec, dict):
                raise ValueError("the record is not an object")
        except KeyError:
            raise SkipSample("missing_json", "the sample has no .json member") from None
        except (ValueError, UnicodeDecodeError) as exn:
            raise SkipSample("bad_json", str(exn)[:200]) from None
        media_type = rec.get("media_type") or ("video" if rec.get("video") else "image" if rec.get("image") else "text")
        files = [f for f in rec.get("media_files") or [] if f in raw]
        frames = tiles = None
        grid = (0, 0)
        tmsg = None
        try:
            if media_type == "video":
                name = files[0] if files else next((e for e in VIDEO_EXTENSIONS if e in raw), None)
                if name is None:
                    raise SkipSample("missing_media", "no video bytes in the sample")
                task = (raw[name], cfg, rec.get("start"), rec.get("end"))
                try:
                    arr, seconds = _decode_video(*task) if self.decoder is None else self.decoder.call(*task)
                except IsolationError as exn:
                    raise SkipSample(exn.reason, str(exn)) from None
                frames = torch.from_numpy(arr)
                if cfg.time_message:
                    tmsg = time_message(seconds, int(frames.shape[0]))
            elif media_type == "image":
                names = files or sorted(k for k in raw if k.split(".")[-1] in IMAGE_EXTENSIONS and not k.startswith("__"))
                if not names:
                    raise SkipSample("missing_media", "no image bytes in the sample")
                images = [decode_image(raw[n]) for n in names]
                tiles, grid = image_tiles(images, cfg.image_size, cfg.image_mode, cfg.max_image_grid)
            elif media_type != "text":
                raise SkipSample("bad_record", f"unknown media_type {media_type!r}")
        except MediaError as exn:
            raise SkipSample(exn.reason, str(exn)) from None
        has_visual = frames is not None or tiles is not None
        try:
            messages = place_placeholder(normalize_conversation(rec.get("conversations")), has_visual, tmsg)
            tok = self.conv(messages)
        except ValueError as exn:
            raise SkipSample("bad_conversation", str(exn)[:200]) from None
        n_img = sum(1 for t in tok.input_ids if t == self.conv.image_token_id)
        if n_img != (1 if has_visual else 0):
            raise SkipSample("bad_conversation", f"{n_img} placeholders after tokenization")
        n_vis = 0
        if frames is not None:
            n_vis += cfg.tokens_per_frame * int(frames.shape[0])
        if tiles is not None:
            n_vis += cfg.tokens_per_image * int(tiles.shape[0])
        sample = Sample(
            key=str(key),
            source=self.sources[raw["__source__"]].name,
            input_ids=torch.tensor(tok.input_ids, dtype=torch.long),
            labels=torch.tensor(tok.labels, dtype=torch.long),
            frames=frames,
            tiles=tiles,
            grid=grid,
            num_visual_tokens=n_vis,
            num_text_tokens=len(tok.input_ids) - (1 if has_visual else 0),
        )
        if sample.length > cfg.sample_token_limit:
            raise SkipSample("too_long", f"{sample.length} tokens > max_sample_tokens {cfg.sample_token_limit}")
        return sample

    # -- batches ----------------------------------------------------------------------------------
    def _emit(self, items: list[Sample], position: int, batches: int) -> dict:
        batch = collate(items, self.pad_id, self.cfg.image_size)
        batch["_stream"] = {
            "stream": self.logical,
            "epoch": self.epoch,
            "position": int(position),
            "batches": int(batches),
            "skipped": self.bad.snapshot(),
        }
        return batch

    def __iter__(self):
        cfg = self.cfg
        emitted = self.batches_done
        if emitted >= self.batches_target:
            return
        cur: list[Sample] = []
        longest = 0
        consecutive = 0
        self.bad.muted = self.position > 0  # the replayed part was counted before the state was saved
        for pos, raw in self.raw():
            if pos < self.position:
                continue
            self.bad.muted = False
            try:
                item = self.prepare(raw)
            except SkipSample as exn:
                self.bad.record(exn.reason, raw.get("__url__", "?"), raw.get("__key__"), str(exn))
                item = None
            except Exception as exn:  # a bug or an unexpected decoder failure: count it, never crash
                self.bad.record(f"error:{type(exn).__name__}", raw.get("__url__", "?"), raw.get("__key__"), str(exn)[:300])
                item = None
            if item is None:
                consecutive += 1
                if consecutive >= cfg.max_consecutive_errors:
                    raise RuntimeError(
                        f"stream {self.g}: {consecutive} bad samples in a row ({self.bad.by_reason}); "
                        "check the shards (see the warnings above)"
                    )
                continue
            consecutive = 0
            new_longest = max(longest, item.length)
            if cur and (len(cur) + 1) * new_longest > cfg.max_tokens_per_batch:
                emitted += 1
                yield self._emit(cur, pos, emitted)
                if emitted >= self.batches_target:
                    return
                cur, new_longest = [], item.length
            cur.append(item)
            longest = new_longest
            if len(cur) >= cfg.max_batch_size:  # full by count: no need to look ahead
                emitted += 1
                yield self._emit(cur, pos + 1, emitted)
                if emitted >= self.batches_target:
                    return
                cur, longest = [], 0
        raise RuntimeError(
            f"stream {self.g}: no readable samples left after {emitted} of {self.batches_target} batches "
            f"(skipped: {self.bad.by_reason}); every source is empty or unreadable for this stream"
        )


# --------------------------------------------------------------------------------------------------
# the per-epoch dataset (what the DataLoader workers run) and the resumable loader


class _EpochDataset(IterableDataset):
    """One epoch of this rank's streams; DataLoader worker ``w`` runs stream ``(w + rotation) % W``."""

    def __init__(self, cfg, sources, tokenizer, rank, world_size, epoch, rotation, per_stream, states):
        super().__init__()
        self.cfg, self.sources, self.tokenizer = cfg, sources, tokenizer
        self.rank, self.world_size, self.epoch, self.rotation = rank, world_size, epoch, rotation
        self.per_stream, self.states = per_stream, states

    def __iter__(self):
        info = get_worker_info()
        W = max(1, self.cfg.num_workers)
        wid = 0 if info is None else info.id
        if info is not None:
            torch.set_num_threads(1)
        logical = (wid + self.rotation) % W
        st = self.states.get(logical, {})
        stream = _Stream(
            self.cfg, self.sources, self.tokenizer, logical, self.rank * W + logical, self.world_size * W,
            self.epoch, st.get("position", 0), st.get("batches", 0), self.per_stream, st.get("skipped"),
        )  # fmt: skip
        yield from stream


class VideoLoader:
    """The resumable batch iterable of one rank (see the module doc).

    Iterating yields the rest of the current epoch (``len(loader)`` batches for a fresh epoch), then the
    epoch counter moves on; iterating again continues where the last batch handed out left off, also
    after ``break``. ``state_dict()`` / ``load_state_dict()`` capture that position exactly.
    """

    def __init__(self, cfg: LoaderConfig, tokenizer, rank: int = 0, world_size: int = 1):
        cfg.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token (Qwen2: set pad_token to <|endoftext|>)")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.rank, self.world_size = int(rank), int(world_size)
        self.sources = resolve_sources(cfg.sources)
        ConversationTokenizer(tokenizer, cfg.conversation_format, cfg.label_quirk)  # fail early
        self.num_streams_per_rank = max(1, cfg.num_workers)
        self.per_stream = math.ceil(cfg.batches_per_epoch / self.num_streams_per_rank)
        self.epoch = 0
        self.batches_in_epoch = 0
        self._streams: dict[int, dict] = {}
        self._past_skips: dict = {}

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.per_stream * self.num_streams_per_rank

    @property
    def image_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids("<image>"))

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (normally the loader advances by itself)."""
        self._finish_epoch()
        self.epoch = int(epoch)

    def _finish_epoch(self) -> None:
        for st in self._streams.values():
            _merge_counts(self._past_skips, st.get("skipped", {}))
        self._streams = {}
        self.batches_in_epoch = 0

    def __iter__(self):
        if self.batches_in_epoch >= len(self):
            self._finish_epoch()
            self.epoch += 1
        W = self.num_streams_per_rank
        ds = _EpochDataset(self.cfg, self.sources, self.tokenizer, self.rank, self.world_size, self.epoch,
                           self.batches_in_epoch % W, self.per_stream, copy.deepcopy(self._streams))  # fmt: skip
        kw = {}
        if self.cfg.num_workers > 0:
            kw = dict(prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False)
        dl = DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers, pin_memory=self.cfg.pin_memory, **kw)
        for batch in dl:
            st = batch.pop("_stream")
            if st["epoch"] != self.epoch:
                raise RuntimeError(f"internal: a batch of epoch {st['epoch']} arrived in epoch {self.epoch}")
            self._streams[int(st["stream"])] = {k: st[k] for k in ("position", "batches", "skipped")}
            self.batches_in_epoch += 1
            yield batch
        if self.batches_in_epoch != len(self):
            raise RuntimeError(f"internal: epoch {self.epoch} gave {self.batches_in_epoch} of {len(self)} batches")

    # -- state --------------------------------------------------------------------------------------
    def _signature(self) -> dict:
        return {
            "seed": self.cfg.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.cfg.num_workers,
            "batches_per_epoch": len(self),
            "shard_mode": self.cfg.shard_mode,
            "sources": [[s.name, len(s.urls), s.weight] for s in self.sources],
        }

    def state_dict(self) -> dict:
        """The position of this rank's loader (JSON-serialisable)."""
        return {
            "version": STATE_VERSION,
            **self._signature(),
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "streams": {str(k): copy.deepcopy(v) for k, v in sorted(self._streams.items())},
            "past_skipped": copy.deepcopy(self._past_skips),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the last batch recorded in ``state`` (from this rank's loader)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        mine = self._signature()
        for k, v in mine.items():
            got = state.get(k)
            if k == "sources":
                got = [list(x) for x in got or []]
            if got != v:
                raise ValueError(f"loader state was saved with {k}={got!r}, this loader has {k}={v!r}")
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self._streams = {int(k): copy.deepcopy(v) for k, v in state.get("streams", {}).items()}
        self._past_skips = copy.deepcopy(state.get("past_skipped", {}))

    def skip_counts(self) -> dict:
        """Bad samples skipped on this rank so far: ``{"total", "by_reason", "by_shard"}``."""
        out = copy.deepcopy(self._past_skips)
        for st in self._streams.values():
            _merge_counts(out, st.get("skipped", {}))
        out.setdefault("by_reason", {})
        out.setdefault("by_shard", {})
        out["total"] = sum(out["by_reason"].values())
        return out

    def config_dict(self) -> dict:
        return asdict(self.cfg)


def build_loader(cfg: LoaderConfig, tokenizer, rank: int = 0, world_size: int = 1) -> VideoLoader:
    """The training batches of one rank: a :class:`VideoLoader` (see docs/data.md)."""
    return VideoLoader(cfg, tokenizer, rank=rank, world_size=world_size)
