"""The streaming loader: tar shards -> token-budget batches, with constant-cost, exact resume.

Per rank, the loader runs ``W = max(1, num_workers)`` *streams*, one per DataLoader worker; over all
ranks there are ``S = world_size * W`` streams, stream ``g = rank * W + w``. What a stream reads is
decided by :mod:`.units`, a pure function of the seed, the epoch and the shard sizes of the compact
index (``{prefix}-index.json``):

1. **Units and epochs.** Each source's shards are cut into *units* of up to ``unit_samples``
   consecutive samples; a source is an endless run of seeded permutations of its units; an epoch
   takes each source's share of ``samples_per_epoch`` (``weight_i * num_samples_i`` of the mix, so
   weights 1 mix the sources as if concatenated, as LLaVA does) and deals the units in a seeded
   order. Unit ``t`` of the epoch goes to stream ``t mod S``.
2. **Reading by seeking.** A stream reads each sample of its units with one seek and one read of
   exactly its bytes (the offsets come from ``{shard}.offsets.npy``, or from one walk over the tar
   headers for older shard sets), so the bytes read are the bytes of the samples used, whatever the
   number of streams per shard (:mod:`.shards`).
3. **Shuffle** within a window of ``ceil(shuffle_buffer / unit_samples)`` units of the stream, by a
   permutation seeded by the window's unit ids (``shuffle_buffer=1``: no shuffle). Samples are read
   when their turn comes, so the window costs no memory.
4. **Decode in the worker**: frame indices from the stage's policy, frames at the target size
   (``video_backend``: torchcodec full-size + uint8 bicubic when it loads, else decord), images,
   the conversation with the placeholder and time message, labels. A sample that fails anywhere is
   logged (rate-limited), counted per reason and per shard, and skipped. Videos are decoded in a
   child process of the stream (:mod:`.isolation`, ``decode_isolation="subprocess"``), whichever the
   backend: a file that crashes the native decoder (segfault, abort) or hangs past ``decode_timeout_s`` is skipped as
   ``decoder_crash`` / ``decoder_timeout`` and the child is replaced.
5. **Batches under a token budget**: samples are taken in stream order while
   ``batch_size * longest_sample <= max_tokens_per_batch`` (a sample's length counts its visual tokens,
   ``tokens_per_frame * frames + tokens_per_image * tiles``, plus its text tokens); a batch closes when
   the next sample would break the budget (that sample opens the next batch) or when it reaches
   ``max_batch_size``. A sample longer than ``max_sample_tokens`` is skipped (``too_long``).
   **Packing** (``pack_tokens``): samples are laid end to end in rows of at most ``pack_tokens``
   tokens instead, in stream order (i.e. the order the shuffle window gives); a row closes when the
   next sample would overflow it (that sample opens the next row), and a batch is ``pack_rows``
   rows (:func:`.collate.collate_packed`, which records each sample's length). No sample is held
   back or reordered, so the position after a batch is all that resume needs, as without packing.
6. Every stream yields exactly ``ceil(batches_per_epoch / W)`` batches per epoch, so every rank yields
   the same number of batches (DataLoader workers are served round robin). A stream that has used
   the last unit of the epoch reads on into the next epoch's units rather than stopping.

**Resume in constant time.** Each batch carries its stream's position ``(window, offset)`` after it.
The main process records, for every stream, the position and batch count of the last batch it
handed out, plus the epoch's plan (how units are dealt to streams). A loader rebuilt with that state
recomputes one window's permutation per stream and reads on from the offset: nothing before it is
read again, whatever the position in the epoch. DataLoader worker ids are rotated so that the round
robin continues with the stream that was next: the batches are the same as without the interruption.

**Another world size or worker count.** The state is a global description: given the states of all
old ranks (``load_state_dict([state_rank0, state_rank1, ...])``), every new rank computes the same
new plan (:func:`.units.replan`): what the old streams consumed is done, the ragged rest between the
lowest and the highest frontier is split evenly over the new streams first, then the epoch goes on
with the new stride; the old ranks' remaining batches of the epoch are spread over the new ranks.
Every sample of the epoch is read exactly once over the whole run.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .collate import Sample, collate, collate_packed, worker_uint8
from .conversation import ConversationTokenizer, normalize_conversation, place_placeholder, time_message
from .decode import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, MediaError, VideoDecoder, decode_image, image_tiles
from .isolation import Isolated, IsolationError, result_area
from .sampling import frame_indices, parse_policy, span_to_frames
from .shards import CountingFile, expand_shards, index_path_for, load_offsets, parse_sample, scan_offsets
from .units import Plan, UnitTable, replan, window_samples

__all__ = [
    "DataSource",
    "LoaderConfig",
    "VideoLoader",
    "build_loader",
    "load_sources",
    "resolve_sources",
    "SkipSample",
    "OlderLoaderState",
]

log = logging.getLogger("videoflash.data")

STATE_VERSION = 2


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
        pack_tokens: None (padded batches) or the tokens of one packed row: samples end to end, each
            row at most this long; a longer sample is skipped (``too_long``).
        pack_rows: packed rows per batch (with ``pack_tokens``).
    Streaming (see :mod:`.units`):
        num_workers: DataLoader workers (= streams per rank); 0 runs one stream in-process.
        seed: the seed of every unit order, mix draw and shuffle.
        samples_per_epoch: samples one epoch deals out (default: the whole weighted mix); smaller
            values walk through a web-scale mix over several epochs.
        unit_samples: consecutive samples of a shard dealt as one unit.
        shuffle_buffer: samples per shuffle window (rounded up to whole units; 1: stream order).
        log_every: log the first bad sample of each reason, then every ``log_every``-th.
        max_consecutive_errors: a stream that meets this many bad samples in a row stops with an error.
    Decoding:
        decode_threads: the decoder's threads per video.
        video_backend: ``auto`` (torchcodec when it loads, else decord), ``torchcodec``, ``decord`` or
            ``pyav`` (:mod:`videoflash.model.video_io`); every backend picks the same frame indices.
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
    samples_per_epoch: int | None = None
    unit_samples: int = 8
    shuffle_buffer: int = 1000
    prefetch_factor: int = 2
    pin_memory: bool = False
    decode_threads: int = 1
    video_backend: str = "auto"
    log_every: int = 100
    max_consecutive_errors: int = 1000
    decode_isolation: str = "subprocess"
    decode_timeout_s: float = 120.0
    pack_tokens: int | None = None
    pack_rows: int = 1

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        parse_policy(self.frame_policy)
        pos = (
            "image_size", "max_frames", "local_num_frames", "max_image_grid", "max_tokens_per_batch",
            "max_batch_size", "batches_per_epoch", "shuffle_buffer", "unit_samples", "log_every",
            "max_consecutive_errors", "decode_threads", "pack_rows",
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
        if self.samples_per_epoch is not None and int(self.samples_per_epoch) < 1:
            raise ValueError(f"LoaderConfig.samples_per_epoch must be >= 1 or None, got {self.samples_per_epoch!r}")
        if self.decode_isolation not in ("subprocess", "inline"):
            raise ValueError(
                f"LoaderConfig.decode_isolation must be 'subprocess' or 'inline', got {self.decode_isolation!r}"
            )
        from ..model.video_io import BACKENDS, resolve_backend

        if self.video_backend not in BACKENDS:
            raise ValueError(f"LoaderConfig.video_backend must be one of {BACKENDS}, got {self.video_backend!r}")
        try:
            resolve_backend(self.video_backend)
        except ValueError as exn:
            raise ValueError(f"LoaderConfig.video_backend: {exn}") from None
        if not float(self.decode_timeout_s) > 0:
            raise ValueError(f"LoaderConfig.decode_timeout_s must be > 0, got {self.decode_timeout_s!r}")
        if self.pack_tokens is not None and int(self.pack_tokens) < 1:
            raise ValueError(f"LoaderConfig.pack_tokens must be >= 1 or None, got {self.pack_tokens!r}")
        if not self.sources:
            raise ValueError("LoaderConfig.sources is empty")

    @property
    def sample_token_limit(self) -> int:
        limit = int(self.max_sample_tokens or self.max_tokens_per_batch)
        return min(limit, int(self.pack_tokens)) if self.pack_tokens else limit

    @property
    def window_units(self) -> int:
        return max(1, -(-int(self.shuffle_buffer) // int(self.unit_samples)))


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
    """A source ready for the streams: expanded shard paths, samples per shard, its size and weight."""

    name: str
    urls: list
    weight: float
    num_samples: int
    shard_sizes: list = field(default_factory=list)  # samples per url (from the index, or counted)


def resolve_sources(sources) -> list[_Resolved]:
    """Expand the shard patterns of ``sources`` (a list of :class:`DataSource` / dicts / patterns, or
    a ``sources.yaml`` path) and read their sizes from the compact index; each result has ``name``,
    ``urls``, ``weight``, ``num_samples`` (the source's share in the mix) and ``shard_sizes``.

    A shard the index does not list (or a set without an index) is counted from its tar headers,
    with a log line."""
    if isinstance(sources, str):
        sources = load_sources(sources)
    out = []
    for i, s in enumerate(sources):
        if isinstance(s, dict):
            s = DataSource(**s)
        if isinstance(s, str):
            s = DataSource(shards=s)
        urls = _expand_with_index(s.shards)
        for u in urls:
            if "://" in u or u.startswith("pipe:"):
                raise ValueError(f"source {s.name or i}: {u}: the loader reads shards by seeking, "
                                 "so they must be local or mounted files")  # fmt: skip
        name = s.name
        idx_path = index_path_for(urls)
        known = {}
        if idx_path is not None:
            known = _shard_sizes(idx_path)
            if name is None:
                name = os.path.basename(idx_path)[: -len("-index.json")]
        per_shard = [known.get(os.path.basename(u)) for u in urls]
        missing = [k for k, n in enumerate(per_shard) if n is None]
        if missing:
            log.warning("source %s: %d of %d shards are not in an index beside %s; counting their samples "
                        "from the tar headers", name or i, len(missing), len(urls), urls[0])  # fmt: skip
            for k in missing:
                per_shard[k] = _count_samples(urls[k])
        size = s.num_samples if s.num_samples is not None else sum(per_shard)
        if not s.weight >= 0:
            raise ValueError(f"source {name or i}: weight must be >= 0, got {s.weight}")
        out.append(_Resolved(name or f"source{i}", urls, float(s.weight), int(size), per_shard))
    if not any(r.weight * r.num_samples > 0 and sum(r.shard_sizes) > 0 for r in out):
        raise ValueError("every source has zero weight or zero samples")
    return out


def _count_samples(url: str) -> int:
    """Samples in one tar shard, from its offsets file or its headers (0 if it cannot be read)."""
    offsets = load_offsets(url)
    if offsets is not None:
        return len(offsets)
    try:
        f = CountingFile(url)
    except OSError as exn:
        log.warning("cannot open shard %s (%s): counted as empty", url, exn)
        return 0
    try:
        return len(scan_offsets(f))
    except ValueError as exn:  # not a tar at all (a damaged one counts the samples before the damage)
        log.warning("cannot read the headers of %s (%s): counted as empty", url, exn)
        return 0
    finally:
        f.close()


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
    """``{shard file name: samples}`` from ``{prefix}-index.json`` (only its ``shards`` list is read)."""
    with open(index_path) as f:
        idx = json.load(f)
    return {s["name"]: int(s["num_samples"]) for s in idx.get("shards", [])}


# --------------------------------------------------------------------------------------------------
# bad samples


class OlderLoaderState(ValueError):
    """A loader state of another :data:`STATE_VERSION` (an older videoflash's stream layout)."""


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

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def record(self, reason: str, shard: str, key: str | None, message: str, count: int = 1) -> None:
        before = self.by_reason.get(reason, 0)
        n = before + count
        self.by_reason[reason] = n
        per = self.by_shard.setdefault(os.path.basename(shard or "?"), {})
        per[reason] = per.get(reason, 0) + count
        if before == 0 or n // self.log_every > before // self.log_every:
            log.warning("%sskipped sample %s in %s (%s, #%d): %s", self.where, key, shard, reason, n, message)

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
    ``(uint8 [N, S, S, 3] array, seconds)``. Raises :class:`MediaError`. In the decode child the
    frames are decoded straight into its shared area (:func:`.isolation.result_area`)."""
    dec = VideoDecoder(data, size=cfg.image_size, num_threads=cfg.decode_threads, backend=cfg.video_backend)
    try:
        first, stop = span_to_frames(dec.num_frames, dec.fps, start, end)
        idx = frame_indices(dec.num_frames, dec.fps, cfg.frame_policy, cfg.min_frames, cfg.max_frames,
                            start=start, end=end, local_num_frames=cfg.local_num_frames)  # fmt: skip
    except ValueError as exn:
        raise MediaError("bad_span", str(exn)) from None
    shape = (len(idx), *dec.out_hw, 3)
    area = result_area(math.prod(shape))
    out = None if area is None else torch.from_numpy(area).view(shape)
    return dec.frames(idx, out=out).numpy(), (stop - first) / dec.fps


class _SharedFrames:
    """Where a stream copies its decode child's frames out of the shared area: a new uint8 tensor,
    in shared memory inside a DataLoader worker, that becomes the sample's frames; a batch of one
    video then goes to the training process without another copy (:func:`.collate.collate`)."""

    def __init__(self):
        self.last: torch.Tensor | None = None

    def __call__(self, nbytes: int):
        self.last = worker_uint8(nbytes)
        return self.last.numpy()

    def frames_of(self, arr) -> torch.Tensor:
        """The tensor of the result array ``arr``: the one allocated for it when ``arr`` is its
        memory (so it keeps its shared storage), else ``arr`` as a tensor (a result that came
        through the pipe)."""
        t, self.last = self.last, None
        if t is not None and arr.nbytes == t.numel() and arr.__array_interface__["data"][0] == t.data_ptr():
            return t.view(arr.shape)
        return torch.from_numpy(arr)


def _video_decoder(cfg: LoaderConfig, g: int) -> Isolated | None:
    """The decode child of stream ``g`` (forked at its first video: a stream holds no sample data
    between reads, and streams built only to plan or seek never fork), or None when
    ``decode_isolation`` is ``inline``."""
    if cfg.decode_isolation == "inline":
        return None
    # the largest video result (max_frames frames at the target size) travels through shared memory
    frame_bytes = int(cfg.max_frames) * int(cfg.image_size) ** 2 * 3
    return Isolated(_decode_video, timeout=float(cfg.decode_timeout_s), name=f"decode process of stream {g}",
                    shared_bytes=frame_bytes, alloc=_SharedFrames())  # fmt: skip


# --------------------------------------------------------------------------------------------------
# one stream


class _Stream:
    """Stream ``g`` of ``plan.streams`` in one epoch, from position ``(window, offset)`` on."""

    _OPEN_FILES = 32  # shard files kept open by one stream (a window's samples come from its units' shards)
    _OFFSETS_KEPT = 256  # shards whose offsets one stream keeps in memory

    def __init__(self, cfg: LoaderConfig, sources, table: UnitTable, plan: Plan, tokenizer, logical: int, g: int,
                 epoch: int, state: dict, batches_target: int):  # fmt: skip
        self.cfg = cfg
        self.sources = sources
        self.table = table
        self.plan = plan
        self.tokenizer = tokenizer
        self.logical = logical
        self.g = g
        self.epoch = epoch
        self.window, self.offset = (int(x) for x in state.get("position", (0, 0)))
        self.batches_done = int(state.get("batches", 0))
        self.batches_target = int(batches_target)
        self.bad = BadSampleCounter(cfg.log_every, where=f"[stream {g} epoch {epoch}] ")
        self.bad.load(state.get("skipped"))
        self.conv = ConversationTokenizer(tokenizer, cfg.conversation_format, cfg.label_quirk)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self._files: dict[str, CountingFile] = {}
        self._offsets: dict[str, object] = {}
        self._scanned_sources: set = set()
        self.bytes_read = 0  # bytes read from shard files (offsets files excluded)
        self.bytes_used = 0  # bytes of the samples consumed (read, then batched or skipped)
        self.decoder = _video_decoder(cfg, g)

    # -- the raw stream: units -> samples by seek (deterministic, no decoding) ---------------------
    def _file(self, url: str) -> CountingFile:
        f = self._files.pop(url, None)
        if f is None:
            if len(self._files) >= self._OPEN_FILES:
                self._close(next(iter(self._files)))
            f = CountingFile(url)
        self._files[url] = f  # most recently used last
        return f

    def _close(self, url: str) -> None:
        f = self._files.pop(url)
        self.bytes_read += f.bytes_read
        f.close()

    def close(self) -> None:
        for url in list(self._files):
            self._close(url)

    def read_bytes(self) -> int:
        return self.bytes_read + sum(f.bytes_read for f in self._files.values())

    def _offsets_of(self, i: int, url: str):
        """Offsets of ``url``'s samples: its offsets file, or one walk over its tar headers."""
        got = self._offsets.get(url)
        if got is None:
            got = load_offsets(url)
            if got is None:
                if i not in self._scanned_sources:
                    self._scanned_sources.add(i)
                    log.info("stream %d: source %s has shards without an offsets file (made before index format 2); "
                             "reading their tar headers once per shard", self.g, self.sources[i].name)  # fmt: skip
                got = scan_offsets(self._file(url))
            if len(self._offsets) >= self._OFFSETS_KEPT:
                self._offsets.pop(next(iter(self._offsets)))
            self._offsets[url] = got
        return got

    def _read(self, t: int, m: int) -> dict:
        """Member ``m`` of unit ``t``: one seek and one read of exactly its bytes.

        A damaged shard costs the samples it damages: a range that does not parse is ``tar_error``, a
        sample the index promised but the tar (cut short, or a bad header where the offsets were found
        by scanning) does not hold is ``missing_in_tar``."""
        i, u, first, _ = self.table.unit(t)
        url, j = self.sources[i].urls[u], first + m
        try:
            offsets = self._offsets_of(i, url)
            if j >= len(offsets):
                raise SkipSample("missing_in_tar", f"sample {j} of {url}: the tar holds only {len(offsets)}")
            start, length = (int(x) for x in offsets[j])
            f = self._file(url)
            f.seek(start)
            blob = f.read(length)
        except OSError as exn:
            raise SkipSample("tar_error", f"{url}: {type(exn).__name__}: {exn}") from None
        except (ValueError, EOFError) as exn:  # tar headers that cannot be walked
            raise SkipSample("tar_error", f"{url}: {exn}") from None
        self.bytes_used += length
        if len(blob) < length:
            raise SkipSample("missing_in_tar", f"sample {j} of {url}: the file ends {length - len(blob)} bytes early")
        try:
            sample = parse_sample(blob, url)
        except ValueError as exn:
            raise SkipSample("tar_error", f"sample {j} of {url}: {exn}") from None
        sample["__source__"] = i
        return sample

    def raw(self):
        """``((window, offset) after it, (unit id, member))`` of every raw sample from the stream's
        position on (endless: past the epoch's units come the next epoch's)."""
        w, off = self.window, self.offset
        while True:
            order = window_samples(self.table, self.plan, self.g, w, self.cfg.window_units, self.cfg.shuffle_buffer > 1)
            for k in range(off, len(order)):
                yield (w, k + 1), order[k]
            w, off = w + 1, 0

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
                frames = torch.from_numpy(arr) if self.decoder is None else self.decoder.alloc.frames_of(arr)
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
    def _emit(self, items: list, position, batches: int) -> dict:
        if self.cfg.pack_tokens:
            batch = collate_packed(items, self.pad_id, self.cfg.image_size)
        else:
            batch = collate(items, self.pad_id, self.cfg.image_size)
        read, used = self.read_bytes(), self.bytes_used
        batch["_stream"] = {
            "stream": self.logical,
            "epoch": self.epoch,
            "position": list(position),
            "batches": int(batches),
            "skipped": self.bad.snapshot(),
            "bytes_read": read - self._reported[0],
            "bytes_used": used - self._reported[1],
        }
        self._reported = (read, used)
        return batch

    def __iter__(self):
        try:
            yield from self._batches()
        finally:
            self.close()

    def _batches(self):
        cfg = self.cfg
        emitted = self.batches_done
        if emitted >= self.batches_target:
            return
        self._reported = (0, 0)
        cur: list[Sample] = []
        longest = 0
        rows: list[list[Sample]] = [[]]  # packing: the rows of the batch being filled
        used = 0  # tokens in its last row
        consecutive = 0
        last = (self.window, self.offset)  # the position before the current sample
        for after, (t, m) in self.raw():
            raw: dict = {}
            try:
                raw = self._read(t, m)
                item = self.prepare(raw)
            except Exception as exn:  # SkipSample, or a bug / an unexpected decoder failure: count it, never crash
                i, u, first, _ = self.table.unit(t)
                reason = exn.reason if isinstance(exn, SkipSample) else f"error:{type(exn).__name__}"
                key = raw.get("__key__", f"#{first + m}")
                self.bad.record(reason, self.sources[i].urls[u], key, str(exn)[:300])
                item = None
            if item is None:
                last = after
                consecutive += 1
                if consecutive >= cfg.max_consecutive_errors:
                    raise RuntimeError(
                        f"stream {self.g}: {consecutive} bad samples in a row ({self.bad.by_reason}); "
                        "check the shards (see the warnings above)"
                    )
                continue
            consecutive = 0
            if cfg.pack_tokens:  # next fit, in stream order: rows of at most pack_tokens tokens
                if rows[-1] and used + item.length > cfg.pack_tokens:
                    if len(rows) == cfg.pack_rows:
                        emitted += 1
                        yield self._emit(rows, last, emitted)
                        if emitted >= self.batches_target:
                            return
                        rows = []
                    rows.append([])
                    used = 0
                rows[-1].append(item)
                used += item.length
                last = after
                continue
            new_longest = max(longest, item.length)
            if cur and (len(cur) + 1) * new_longest > cfg.max_tokens_per_batch:
                emitted += 1
                yield self._emit(cur, last, emitted)
                if emitted >= self.batches_target:
                    return
                cur, new_longest = [], item.length
            cur.append(item)
            longest = new_longest
            last = after
            if len(cur) >= cfg.max_batch_size:  # full by count: no need to look ahead
                emitted += 1
                yield self._emit(cur, after, emitted)
                if emitted >= self.batches_target:
                    return
                cur, longest = [], 0


# --------------------------------------------------------------------------------------------------
# the per-epoch dataset (what the DataLoader workers run) and the resumable loader


class _EpochDataset(IterableDataset):
    """One epoch of this rank's streams; DataLoader worker ``w`` runs stream ``(w + rotation) % W``."""

    def __init__(self, cfg, sources, table, plan, tokenizer, rank, epoch, rotation, per_stream, states):
        super().__init__()
        self.cfg, self.sources, self.table, self.plan, self.tokenizer = cfg, sources, table, plan, tokenizer
        self.rank, self.epoch, self.rotation = rank, epoch, rotation
        self.per_stream, self.states = per_stream, states

    def __iter__(self):
        info = get_worker_info()
        W = max(1, self.cfg.num_workers)
        wid = 0 if info is None else info.id
        if info is not None:
            torch.set_num_threads(1)
        logical = (wid + self.rotation) % W
        stream = _Stream(self.cfg, self.sources, self.table, self.plan, self.tokenizer, logical,
                         self.rank * W + logical, self.epoch, self.states.get(logical, {}), self.per_stream)  # fmt: skip
        yield from stream


class VideoLoader:
    """The resumable batch iterable of one rank (see the module doc).

    Iterating yields the rest of the current epoch (``len(loader)`` batches for a fresh epoch), then the
    epoch counter moves on; iterating again continues where the last batch handed out left off, also
    after ``break``. ``state_dict()`` / ``load_state_dict()`` capture that position exactly;
    ``load_state_dict`` also takes the list of every rank's state of a run with another world size or
    worker count.
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
        self.table = UnitTable([s.shard_sizes for s in self.sources], [s.weight for s in self.sources],
                               cfg.unit_samples, cfg.samples_per_epoch, cfg.seed,
                               num_samples=[s.num_samples for s in self.sources])  # fmt: skip
        ConversationTokenizer(tokenizer, cfg.conversation_format, cfg.label_quirk)  # fail early
        self.num_streams_per_rank = max(1, cfg.num_workers)
        self.per_stream = math.ceil(cfg.batches_per_epoch / self.num_streams_per_rank)
        self.epoch = 0
        self._start_epoch(0)
        self._past_skips: dict = {}
        self.bytes_read = 0  # shard bytes read for the batches handed out by this object
        self.bytes_used = 0  # bytes of the samples consumed for them

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.per_stream * self.num_streams_per_rank

    @property
    def image_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids("<image>"))

    def _start_epoch(self, epoch: int) -> None:
        """Epoch ``epoch`` from its beginning: a fresh plan, every stream at its first window."""
        self.epoch = int(epoch)
        self.plan = Plan(self.world_size * self.num_streams_per_rank, self.epoch * self.table.epoch_units)
        self.segment_per_stream = self.per_stream  # batches per stream in the rest of this epoch
        self.batches_in_segment = 0
        self._streams: dict[int, dict] = {}

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (normally the loader advances by itself)."""
        self._finish_epoch()
        self._start_epoch(epoch)

    def _finish_epoch(self) -> None:
        for st in self._streams.values():
            _merge_counts(self._past_skips, st.get("skipped", {}))
        self._streams = {}

    @property
    def _segment_len(self) -> int:
        return self.segment_per_stream * self.num_streams_per_rank

    def __iter__(self):
        if self.batches_in_segment >= self._segment_len:
            self._finish_epoch()
            self._start_epoch(self.epoch + 1)
        W = self.num_streams_per_rank
        ds = _EpochDataset(self.cfg, self.sources, self.table, self.plan, self.tokenizer, self.rank, self.epoch,
                           self.batches_in_segment % W, self.segment_per_stream, copy.deepcopy(self._streams))  # fmt: skip
        kw = {}
        if self.cfg.num_workers > 0:
            kw = dict(prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False)
        dl = DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers, pin_memory=self.cfg.pin_memory, **kw)
        for batch in dl:
            st = batch.pop("_stream")
            if st["epoch"] != self.epoch:
                raise RuntimeError(f"internal: a batch of epoch {st['epoch']} arrived in epoch {self.epoch}")
            self._streams[int(st["stream"])] = {k: st[k] for k in ("position", "batches", "skipped")}
            self.bytes_read += st["bytes_read"]
            self.bytes_used += st["bytes_used"]
            self.batches_in_segment += 1
            yield batch
        if self.batches_in_segment != self._segment_len:
            raise RuntimeError(f"internal: epoch {self.epoch} gave {self.batches_in_segment} of {self._segment_len} batches")

    # -- state --------------------------------------------------------------------------------------
    def _data_signature(self) -> dict:
        """What must match for a state to describe this loader's data at all."""
        return {
            "seed": self.cfg.seed,
            "unit_samples": self.cfg.unit_samples,
            "window_units": self.cfg.window_units,
            "shuffle": self.cfg.shuffle_buffer > 1,
            "epoch_units": self.table.epoch_units,
            "sources": [[s.name, len(s.urls), s.weight, sum(s.shard_sizes)] for s in self.sources],
        }

    def _layout(self) -> dict:
        return {"world_size": self.world_size, "num_workers": self.cfg.num_workers, "batches_per_epoch": len(self)}

    def state_dict(self) -> dict:
        """The position of this rank's loader (JSON-serialisable; the plan is the same on every rank)."""
        return {
            "version": STATE_VERSION,
            **self._data_signature(),
            **self._layout(),
            "rank": self.rank,
            "epoch": self.epoch,
            "plan": self.plan.to_json(),
            "segment_per_stream": self.segment_per_stream,
            "batches_in_segment": self.batches_in_segment,
            "streams": {str(k): copy.deepcopy(v) for k, v in sorted(self._streams.items())},
            "past_skipped": copy.deepcopy(self._past_skips),
        }

    def _check(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise OlderLoaderState(f"loader state version {state.get('version')!r} is not {STATE_VERSION}: saved by "
                                   "an older loader, whose stream layout this one cannot continue")
        for k, v in self._data_signature().items():
            got = state.get(k)
            if k == "sources":
                got = [list(x) for x in got or []]
            if got != v:
                raise ValueError(f"loader state was saved with {k}={got!r}, this loader has {k}={v!r}")

    def same_layout(self, state: dict) -> bool:
        """Whether ``state`` (one rank's) was saved with this loader's world size, worker count and
        epoch length, so that this rank's own state continues it exactly."""
        return {k: state.get(k) for k in self._layout()} == self._layout()

    def load_state_dict(self, state) -> None:
        """Continue exactly after the last batch recorded in ``state``.

        ``state``: this rank's own state (same world size and worker count), or the list of every
        rank's state of the saved run (any world size and worker count: see the module doc)."""
        states = state if isinstance(state, (list, tuple)) else [state]
        for st in states:
            self._check(st)
        old_layout = {k: states[0].get(k) for k in self._layout()}
        same = self.same_layout(states[0])
        if isinstance(state, dict):
            if not same or state.get("rank") != self.rank:
                diff = {k: v for k, v in old_layout.items() if v != self._layout()[k]}
                if state.get("rank") != self.rank:
                    diff["rank"] = state.get("rank")
                raise ValueError(f"loader state was saved with {diff} (this loader: rank {self.rank}, "
                                 f"{self._layout()}); pass every rank's state to continue with another layout")  # fmt: skip
            self._restore(state)
            return
        ranks = sorted(int(st["rank"]) for st in states)
        if ranks != list(range(int(old_layout["world_size"]))):
            raise ValueError(f"need the loader states of ranks 0..{old_layout['world_size'] - 1}, got ranks {ranks}")
        for k in ("epoch", "plan", "segment_per_stream", "batches_in_segment", "world_size", "num_workers"):
            if any(st.get(k) != states[0].get(k) for st in states):
                raise ValueError(f"the ranks' loader states differ in {k!r}: not saved at the same step")
        if same:
            self._restore(next(st for st in states if int(st["rank"]) == self.rank))
            return
        self._relayout(sorted(states, key=lambda st: int(st["rank"])))

    def _restore(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.plan = Plan.from_json(state["plan"])
        self.segment_per_stream = int(state["segment_per_stream"])
        self.batches_in_segment = int(state["batches_in_segment"])
        self._streams = {int(k): copy.deepcopy(v) for k, v in state.get("streams", {}).items()}
        self._past_skips = copy.deepcopy(state.get("past_skipped", {}))

    def _relayout(self, states: list[dict]) -> None:
        """The rest of the saved epoch, dealt to this run's streams (every rank computes the same)."""
        first = states[0]
        W_old = max(1, int(first["num_workers"]))
        positions = {}
        skips: dict = {}
        for st in states:
            _merge_counts(skips, st.get("past_skipped", {}))
            for k, v in st.get("streams", {}).items():
                positions[int(st["rank"]) * W_old + int(k)] = tuple(v["position"])
                _merge_counts(skips, v.get("skipped", {}))
        old_plan = Plan.from_json(first["plan"])
        self.epoch = int(first["epoch"])
        W = self.num_streams_per_rank
        self.plan = replan(self.table, old_plan, positions, self.world_size * W, self.cfg.window_units,
                           self.cfg.shuffle_buffer > 1)  # fmt: skip
        left = (int(first["segment_per_stream"]) * W_old - int(first["batches_in_segment"])) * int(first["world_size"])
        per_rank = math.ceil(left / self.world_size)
        self.segment_per_stream = math.ceil(per_rank / W)
        self.batches_in_segment = 0
        self._streams = {}
        self._past_skips = skips if self.rank == 0 else {}  # the old ranks' counts, counted once
        log.info("loader: %d ranks x %d workers -> %d x %d in epoch %d: %d items of the old streams' ragged rest "
                 "dealt first, %d batches per rank left in the epoch", first["world_size"], first["num_workers"],
                 self.world_size, self.cfg.num_workers, self.epoch, sum(len(h) for h in self.plan.head),
                 self._segment_len)  # fmt: skip

    def skip_counts(self) -> dict:
        """Bad samples skipped on this rank so far: ``{"total", "by_reason", "by_shard"}``."""
        out = copy.deepcopy(self._past_skips)
        for st in self._streams.values():
            _merge_counts(out, st.get("skipped", {}))
        out.setdefault("by_reason", {})
        out.setdefault("by_shard", {})
        out["total"] = sum(out["by_reason"].values())
        return out

    def read_stats(self) -> dict:
        """Shard bytes read for the batches this object handed out, and the bytes of the samples they
        consumed (their tar records); ``amplification`` is their ratio."""
        return {"bytes_read": self.bytes_read, "bytes_used": self.bytes_used,
                "amplification": self.bytes_read / max(1, self.bytes_used)}  # fmt: skip

    def config_dict(self) -> dict:
        return asdict(self.cfg)


def build_loader(cfg: LoaderConfig, tokenizer, rank: int = 0, world_size: int = 1) -> VideoLoader:
    """The training batches of one rank: a :class:`VideoLoader` (see docs/data.md)."""
    return VideoLoader(cfg, tokenizer, rank=rank, world_size=world_size)
