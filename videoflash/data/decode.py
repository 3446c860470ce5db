"""Decoding media bytes to uint8 tensors at the target size.

Videos (``backend``, :mod:`videoflash.model.video_io`, shared with the processor): torchcodec
decodes the requested frames at full size from the bytes in memory, 16 at a time, and torch's uint8
bicubic antialias kernel resizes each chunk to ``size x size`` (a square, no crop, no pad); where
torchcodec cannot load (``auto``) or when asked, decord reads the bytes and its ffmpeg filter graph
scales every decoded frame while decoding; ``pyav`` decodes in order. Only the requested frames are
converted to RGB; the frame count and rate come from the container, so every backend is given the
same indices. Images: Pillow decodes once; the data room then makes the square tile
or the anyres thumbnail + grid tiles with :mod:`videoflash.model.anyres` (the same geometry as the
model's). Everything leaves this module as uint8 ``[N, H, W, 3]``; normalisation happens on the device.

decord 3.4 (decord2) returns a wrongly strided buffer for a few output widths (2..48 in even steps,
96, 144: e.g. 32 and 96 px); :func:`decodable_width` finds that out once per width with a tiny
in-memory video, and :class:`VideoDecoder` then decodes at the next width that works and resizes the
few frames it keeps with the bicubic resize of ``anyres``.
"""

from __future__ import annotations

import io
import re
from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "MediaError",
    "VideoDecoder",
    "decodable_width",
    "native_size",
    "decode_image",
    "image_tiles",
    "probe_video",
    "probe_image",
    "VIDEO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
]

VIDEO_EXTENSIONS = ("mp4", "mkv", "webm", "mov", "avi", "m4v", "mpg", "mpeg", "flv", "ts")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class MediaError(ValueError):
    """Media that cannot be decoded; ``reason`` is a short code for the skip counters."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # pickles whole (it comes back from decode child processes)
        return type(self), (self.reason, str(self))


_DECORD_CLOCK = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


def _decord_message(exn: Exception) -> str:
    """The first line of a decord error without the wall-clock prefix its logger adds (``[07:30:29]``),
    so that the same file gets the same reject message on every run."""
    return _DECORD_CLOCK.sub("", str(exn).splitlines()[0] if str(exn) else type(exn).__name__)[:200]


def _decord():
    import decord  # imported lazily: workers import it once, the main process may never need it

    return decord


def _tiny_mp4(width: int = 64, height: int = 16) -> bytes:
    """A 2-frame H.264 mp4 in memory (PyAV), used to test decord output widths."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=4)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for _ in range(2):
            frame = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


@lru_cache(maxsize=None)
def decodable_width(width: int) -> bool:
    """Whether decord returns a correct ``[N, h, width, 3]`` batch when asked to scale to ``width``."""
    decord = _decord()
    try:
        vr = decord.VideoReader(io.BytesIO(_tiny_mp4()), width=width, height=8, num_threads=1)
        out = vr.get_batch([0, 1]).asnumpy()
        return out.shape == (2, 8, width, 3)
    except Exception:
        return False


def _safe_width(width: int) -> int:
    w = width
    while not decodable_width(w):
        w = (w // 64 + 1) * 64
    return w


def native_size(data: bytes) -> tuple[int, int]:
    """``(height, width)`` of the first video stream, read from the container with PyAV (no decoding)."""
    import av

    try:
        with av.open(io.BytesIO(data)) as c:
            if not c.streams.video:
                raise MediaError("bad_video", "no video stream")
            cc = c.streams.video[0].codec_context
            h, w = int(cc.height), int(cc.width)
    except MediaError:
        raise
    except Exception as exn:
        raise MediaError("bad_video", f"cannot open the video: {str(exn)[:200]}") from exn
    if h < 1 or w < 1:
        raise MediaError("bad_video", f"the video reports a size of {w}x{h}")
    return h, w


class VideoDecoder:
    """A video held in memory, decoded at ``size x size`` (or ``(height, width)``, or the native size
    when ``size`` is None).

    ``backend`` (:data:`videoflash.model.video_io.BACKENDS`): ``auto`` (torchcodec when it loads,
    else decord), ``torchcodec`` / ``pyav`` (full-size frames, resized a chunk at a time with the
    uint8 bicubic of :func:`~videoflash.model.video_io.resize_uint8`) or ``decord`` (scaled in its
    filter graph while decoding). The frame count and rate come from the container, so a frame policy
    picks the same indices whichever backend decodes.

    Raises :class:`MediaError` (reason ``bad_video`` / ``empty_media``) when the bytes cannot be opened.
    """

    def __init__(self, data: bytes, size: int | tuple[int, int] | None = None, num_threads: int = 1,
                 backend: str = "auto"):  # fmt: skip
        from ..model.video_io import FrameReader, resolve_backend

        if not data:
            raise MediaError("empty_media", "the video has zero bytes")
        self.backend = resolve_backend(backend)
        if size is None:
            self.out_hw = native_size(data)
        elif isinstance(size, int):
            self.out_hw = (int(size), int(size))
        else:
            self.out_hw = (int(size[0]), int(size[1]))
        self.size = size
        self._vr = self._reader = None
        if self.backend != "decord":
            try:
                self._reader = FrameReader(data, self.backend, num_threads)
            except Exception as exn:
                raise MediaError("bad_video", f"cannot open the video: {_decord_message(exn)}") from exn
            self.num_frames, self.fps = self._reader.num_frames, self._reader.fps
            if self.num_frames < 1 or not self.fps > 0:
                raise MediaError("bad_video", f"the video reports {self.num_frames} frames at {self.fps} fps")
            return
        decord = _decord()
        self._decode_w = _safe_width(self.out_hw[1])
        kw = {"width": self._decode_w, "height": self.out_hw[0]}
        if size is None and self._decode_w == self.out_hw[1]:
            kw = {}
        try:
            self._vr = decord.VideoReader(io.BytesIO(data), num_threads=num_threads, **kw)
            self.num_frames = len(self._vr)
            self.fps = float(self._vr.get_avg_fps())
        except Exception as exn:  # decord raises RuntimeError / DECORDError / AssertionError
            raise MediaError("bad_video", f"cannot open the video: {_decord_message(exn)}") from exn
        if self.num_frames < 1 or not self.fps > 0:
            raise MediaError("bad_video", f"the video reports {self.num_frames} frames at {self.fps} fps")

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    def _read_decord(self, uniq: list[int]) -> torch.Tensor:
        try:
            # DLPack hands decord's buffer to torch without a copy
            got = torch.utils.dlpack.from_dlpack(self._vr.get_batch(uniq).to_dlpack())
        except Exception as exn:
            raise MediaError("bad_video", f"cannot decode frames: {_decord_message(exn)}") from exn
        finally:
            try:
                self._vr.seek(0)
            except Exception:
                pass
        if tuple(got.shape[1:3]) != self.out_hw:
            from ..model.anyres import resize_frames

            got = resize_frames(got, *self.out_hw)
        return got

    def frames(self, indices, out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode the frames at ``indices`` (repeats allowed) -> uint8 ``[N, S, S, 3]``.

        ``out``: a contiguous uint8 tensor of that shape to decode into (returned), so that frames
        meant for another process can be written straight into memory shared with it; the torchcodec
        and PyAV readers fill it chunk by chunk, decord's batch is copied into it."""
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError("no frame indices")
        if min(indices) < 0 or max(indices) >= self.num_frames:
            raise MediaError("bad_video", f"frame index out of range for a {self.num_frames}-frame video")
        if out is not None and (tuple(out.shape) != (len(indices), *self.out_hw, 3) or out.dtype != torch.uint8
                                or not out.is_contiguous()):  # fmt: skip
            raise ValueError(f"out must be contiguous uint8 {(len(indices), *self.out_hw, 3)}, got "
                             f"{out.dtype} {tuple(out.shape)}")  # fmt: skip
        uniq = sorted(set(indices))
        direct = out if uniq == indices else None  # decoded in place unless frames repeat or come unsorted
        if self._reader is None:
            got = self._read_decord(uniq)
        else:
            h, w = self.out_hw
            try:
                got = self._reader.read_resized(uniq, h, w, out=direct)
            except Exception as exn:
                raise MediaError("bad_video", f"cannot decode frames: {_decord_message(exn)}") from exn
            if got.shape[0] != len(uniq) or tuple(got.shape[1:3]) != self.out_hw:
                raise MediaError("bad_video", f"the decoder returned {tuple(got.shape)} for {len(uniq)} frames")
        if uniq != indices:  # repeats (padding) or unsorted input
            pos = {f: k for k, f in enumerate(uniq)}
            order = torch.tensor([pos[i] for i in indices], dtype=torch.long)
            if out is None:
                return got.index_select(0, order)
            return torch.index_select(got, 0, order, out=out)
        if out is not None and got is not out:
            out.copy_(got)
            return out
        return got.contiguous()


def decode_image(data: bytes) -> torch.Tensor:
    """Image bytes -> uint8 ``[H, W, 3]`` (RGB; first frame of an animated file)."""
    from PIL import Image

    if not data:
        raise MediaError("empty_media", "the image has zero bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8).copy()
    except Exception as exn:
        raise MediaError("bad_image", f"cannot decode the image: {exn}") from exn
    return torch.from_numpy(arr)


def image_tiles(
    images: list[torch.Tensor], size: int, mode: str = "square", max_grid: int = 6
) -> tuple[torch.Tensor, tuple[int, int]]:
    """The tiles of a sample's images and their grid (batch contract, ``image_grids``).

    - one image, ``mode="anyres"``: thumbnail + ``gh*gw`` tiles of the best grid -> grid ``(gh, gw)``;
    - one image, ``mode="square"``, or several images: one square tile each -> grid ``(0, 0)``.
    """
    from ..model.anyres import resize_square, select_best_grid, tile_image

    if not images:
        raise ValueError("no images")
    if mode not in ("square", "anyres"):
        raise ValueError(f"unknown image mode {mode!r}; expected 'square' or 'anyres'")
    if len(images) == 1 and mode == "anyres":
        img = images[0]
        grid = select_best_grid(int(img.shape[0]), int(img.shape[1]), size, max_grid)
        return tile_image(img, size, grid), (int(grid[0]), int(grid[1]))
    tiles = torch.cat([resize_square(img[None], size) for img in images])
    return tiles, (0, 0)


def probe_video(data: bytes, full: bool = False, sample_frames: int = 16, backend: str = "auto") -> dict:
    """Open and decode a video to check it and read its metadata.

    ``full=False`` decodes ``sample_frames`` evenly spaced frames including the last one (a truncated
    file fails there); ``full=True`` decodes every frame. Returns ``num_frames``, ``fps``, ``duration``,
    ``width``, ``height``. ``backend``: the decoder that checks the frames (the loader's, so that
    a file the loader's decoder cannot read is rejected here). Raises :class:`MediaError`.
    """
    if not data:
        raise MediaError("empty_media", "the video has zero bytes")
    height, width = native_size(data)
    dec = VideoDecoder(data, size=64, backend=backend)  # decoding small is enough to prove the frames decode
    n = dec.num_frames
    if full:
        for lo in range(0, n, 64):
            dec.frames(range(lo, min(n, lo + 64)))
    else:
        k = min(n, max(2, sample_frames))
        dec.frames(sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist())))
    return {
        "num_frames": n,
        "fps": round(dec.fps, 6),
        "duration": round(n / dec.fps, 6),
        "width": width,
        "height": height,
    }


def probe_image(data: bytes) -> dict:
    """Decode an image fully; returns ``width`` and ``height``. Raises :class:`MediaError`."""
    img = decode_image(data)
    return {"width": int(img.shape[1]), "height": int(img.shape[0])}
