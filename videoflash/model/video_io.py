"""Video decoding backends shared by the processor (model room) and the data room.

Three libraries read a video here, and the caller picks one by name (``backend``):

- ``torchcodec`` (PyTorch's decoder over the system FFmpeg libraries): full-size RGB frames at
  exact indices (``seek_mode="exact"`` scans the packets once, so frame ``i`` is the ``i``-th in
  presentation order), then the uint8 bicubic antialias resize of :func:`resize_uint8`. On the
  bench corpus this is about 1.8x the frames per second per core of decord scaling while it
  decodes (docs/PERFORMANCE.md), because torch's uint8 resize kernel is faster than ffmpeg's
  swscale in decord's filter graph.
- ``decord`` (decord2): scales inside its filter graph while it decodes; the callers keep their own
  decord code (its odd-width workaround), this module only names it.
- ``pyav`` (PyAV, which the project already needs to write videos): decodes every frame up to the
  last one asked for, in order; slow on sparse picks, kept as a reference that needs nothing else.

``auto`` is torchcodec when it imports and its FFmpeg libraries load (checked once per process by
decoding a tiny in-memory video), else decord. decord, PyAV and torchcodec give bit-identical
full-size RGB frames on H.264 (tests/test_decode_backends.py), so the backends differ only in the
resize: decord's swscale against the torch kernel here (a few grey levels).

This file is copied into every exported checkpoint: it imports only torch, numpy and the standard
library at the top; torchcodec and PyAV are imported inside ``try`` blocks when first needed, so
transformers' remote-code import check does not require them.
"""

from __future__ import annotations

import io
import logging
import os
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["BACKENDS", "torchcodec_problem", "resolve_backend", "resize_uint8", "FrameReader"]

BACKENDS = ("auto", "torchcodec", "decord", "pyav")
#: full-size frames decoded per call: 16 frames of 1080p RGB are 100 MB, then resized at once
CHUNK = 16


def _tiny_mp4() -> bytes:
    """A 2-frame 64x16 H.264 mp4 in memory (PyAV), to check that a decoder works."""
    av = _av()

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=4)
        s.width, s.height, s.pix_fmt = 64, 16, "yuv420p"
        for _ in range(2):
            for p in s.encode(av.VideoFrame.from_ndarray(np.zeros((16, 64, 3), np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


@lru_cache(maxsize=None)
def torchcodec_problem() -> str | None:
    """None when torchcodec imports, loads its FFmpeg libraries and decodes a tiny video; else why
    not, in one line (``auto`` then falls back to decord)."""
    try:
        from torchcodec.decoders import VideoDecoder as _TC
    except Exception as exn:  # ImportError, or RuntimeError when no FFmpeg library loads
        return f"torchcodec cannot load ({type(exn).__name__}: {str(exn).splitlines()[0][:160] if str(exn) else ''})"
    try:
        dec = _TC(_tiny_mp4(), seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC")
        if tuple(dec.get_frames_at([1]).data.shape) != (1, 16, 64, 3):
            return "torchcodec decodes a test video to the wrong shape"
    except Exception as exn:
        return f"torchcodec cannot decode a test video ({type(exn).__name__}: {str(exn)[:160]})"
    return None


def resolve_backend(name: str) -> str:
    """``auto`` -> ``torchcodec`` or ``decord``; other names are checked and returned as they are.
    Raises ``ValueError`` for an unknown name or an explicit ``torchcodec`` that cannot load."""
    if name not in BACKENDS:
        raise ValueError(f"unknown video backend {name!r}; expected one of {BACKENDS}")
    if name == "auto":
        if torchcodec_problem() is None:
            return "torchcodec"
        _fallback_notice()
        return "decord"
    if name == "torchcodec" and torchcodec_problem() is not None:
        raise ValueError(f"video backend 'torchcodec' asked for, but {torchcodec_problem()}")
    return name


@lru_cache(maxsize=None)
def _fallback_notice() -> None:
    """One line per process (forked workers inherit that it was said) when ``auto`` falls back."""
    logging.getLogger("videoflash").warning(
        "%s: videos decode with decord (slower; install FFmpeg's libraries, e.g. apt-get install ffmpeg)",
        torchcodec_problem(),
    )


def resize_uint8(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> uint8 ``[N, height, width, 3]``: bicubic with antialias
    (align_corners=False) computed by torch's uint8 kernel on the channels-last view, without a float
    copy. Within one grey level of the float path of ``anyres.resize_frames`` and of Pillow's
    bicubic, and several times faster. Frames already at the size are returned as they are."""
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames [N, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    if tuple(frames.shape[1:3]) == (height, width):
        return frames
    if frames.shape[0] == 0:
        return frames.new_empty((0, height, width, 3))
    x = frames.permute(0, 3, 1, 2)  # NHWC memory seen as channels-last NCHW: no copy
    y = F.interpolate(x, size=(int(height), int(width)), mode="bicubic", align_corners=False, antialias=True)
    return y.permute(0, 2, 3, 1).contiguous()


class FrameReader:
    """Full-size RGB frames of one video (a path or its bytes) by torchcodec or PyAV.

    ``num_frames`` and ``fps`` come from the container (torchcodec: its exact packet scan; PyAV: a
    count of the video packets and the stream's average rate), as decord reads them, so a frame
    policy picks the same indices with every backend. :meth:`chunks` yields uint8 ``[n, H, W, 3]``
    frames for sorted unique indices, at most ``chunk`` at a time. Errors are raised as they come
    (the callers turn them into their own error types).
    """

    def __init__(self, src, backend: str, num_threads: int = 1):
        if backend not in ("torchcodec", "pyav"):
            raise ValueError(f"FrameReader reads with torchcodec or pyav, not {backend!r}")
        self.backend = backend
        self._src = bytes(src) if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src)
        self._threads = int(num_threads)
        if backend == "torchcodec":
            try:
                from torchcodec.decoders import VideoDecoder as _TC
            except ImportError as exn:  # pragma: no cover - depends on the environment
                raise ImportError("the torchcodec backend needs torchcodec (pip install torchcodec)") from exn
            self._dec = _TC(self._src, seek_mode="exact", num_ffmpeg_threads=self._threads, dimension_order="NHWC")
            meta = self._dec.metadata
            self.num_frames = int(meta.num_frames or 0)
            self.fps = float(meta.average_fps or 0.0)
            self.height, self.width = int(meta.height or 0), int(meta.width or 0)
        else:
            av = _av()
            with av.open(self._open_src()) as c:
                if not c.streams.video:
                    raise ValueError("no video stream")
                st = c.streams.video[0]
                rate = st.average_rate or st.guessed_rate
                self.fps = float(rate) if rate else 0.0
                self.height, self.width = int(st.codec_context.height), int(st.codec_context.width)
                self.num_frames = sum(1 for p in c.demux(st) if p.size and p.pts is not None)

    def _open_src(self):
        return io.BytesIO(self._src) if isinstance(self._src, bytes) else self._src

    def chunks(self, uniq: list[int], chunk: int = CHUNK):
        """Yield the frames at the sorted unique indices ``uniq``, ``chunk`` at a time."""
        if self.backend == "torchcodec":
            for lo in range(0, len(uniq), chunk):
                yield self._dec.get_frames_at(uniq[lo : lo + chunk]).data
            return
        av = _av()
        want = iter(uniq)
        nxt = next(want, None)
        got: list[np.ndarray] = []
        with av.open(self._open_src()) as c:
            st = c.streams.video[0]
            st.codec_context.thread_count = max(1, self._threads)
            for k, frame in enumerate(c.decode(st)):
                if nxt is None:
                    break
                if k == nxt:
                    got.append(frame.to_ndarray(format="rgb24"))
                    nxt = next(want, None)
                    if len(got) == chunk:
                        yield torch.from_numpy(np.stack(got))
                        got = []
        if nxt is not None:
            raise ValueError(f"the video ended before frame {nxt}")
        if got:
            yield torch.from_numpy(np.stack(got))

    def read_resized(self, uniq: list[int], height: int | None, width: int | None, resize=resize_uint8,
                     out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The frames at ``uniq`` resized chunk by chunk with ``resize`` (full size when ``height``
        is None): a long video never exists decoded at full size all at once. ``out``: a uint8
        ``[len(uniq), height, width, 3]`` tensor to write the frames into (e.g. memory shared with
        another process), returned; otherwise the frames are a new tensor."""
        if out is None:
            parts = [c if height is None else resize(c, height, width) for c in self.chunks(uniq)]
            return torch.cat(parts) if len(parts) > 1 else parts[0]
        at = 0
        for c in self.chunks(uniq):
            part = c if height is None else resize(c, height, width)
            if at + part.shape[0] > out.shape[0] or tuple(part.shape[1:]) != tuple(out.shape[1:]):
                raise ValueError(f"frames of {tuple(part.shape)} do not fit an output of {tuple(out.shape)} at row {at}")
            out[at : at + part.shape[0]] = part
            at += part.shape[0]
        if at != out.shape[0]:
            raise ValueError(f"the decoder gave {at} frames for an output of {out.shape[0]}")
        return out


def _av():
    try:
        import av
    except ImportError as exn:  # pragma: no cover - depends on the environment
        raise ImportError("the pyav backend needs PyAV (pip install av)") from exn
    return av
