"""Writing real H.264 mp4 files with PyAV (libx264), in memory or on disk.

Used by the synthetic corpus and by ``make_shards`` to turn a folder of frames (or a GIF) into one mp4
at its frame rate. Encoding is single-threaded with fixed settings so that the same frames give the
same bytes on every run.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from fractions import Fraction

import numpy as np

__all__ = ["encode_mp4", "write_mp4", "frame_folder_files", "encode_frame_folder", "encode_gif"]


def encode_mp4(
    frames,
    fps: float,
    crf: int = 20,
    preset: str = "veryfast",
    gop: int | None = None,
    faststart: bool = True,
) -> bytes:
    """Encode uint8 RGB frames ``[N, H, W, 3]`` (an array or an iterable of arrays) to mp4 bytes.

    Odd sizes are padded by one pixel at the right/bottom (yuv420p needs even sizes). ``gop`` is the
    keyframe interval in frames (default: about 2 seconds).
    """
    import av

    frames = iter(frames)
    first = np.asarray(next(frames))
    height, width = first.shape[:2]
    pad_h, pad_w = height % 2, width % 2
    rate = Fraction(fps).limit_denominator(1001)
    # the faststart pass re-reads the file, which the muxer cannot do on a Python file object
    fd, tmp = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    opts = {"movflags": "+faststart"} if faststart else {}
    try:
        _encode_to(tmp, first, frames, rate, fps, crf, preset, gop, opts, pad_h, pad_w, width, height)
        with open(tmp, "rb") as f:
            return f.read()
    finally:
        os.unlink(tmp)


def _encode_to(path, first, frames, rate, fps, crf, preset, gop, opts, pad_h, pad_w, width, height):
    import av

    with av.open(path, "w", format="mp4", options=opts) as c:
        s = c.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = width + pad_w, height + pad_h, "yuv420p"
        g = gop if gop is not None else max(1, int(round(2 * fps)))
        s.options = {"crf": str(crf), "preset": preset, "g": str(g), "threads": "1"}
        s.codec_context.thread_count = 1
        s.codec_context.thread_type = "NONE"
        count = 0

        def put(arr):
            # Converting to yuv420p here (not inside encode) with explicit timestamps makes the decoded
            # frames identical from run to run; PyAV's implicit conversion occasionally was not.
            nonlocal count
            arr = np.asarray(arr, dtype=np.uint8)
            if arr.ndim == 2:
                arr = np.repeat(arr[:, :, None], 3, axis=2)
            if pad_h or pad_w:
                arr = np.pad(arr, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr[:, :, :3]), format="rgb24")
            frame = frame.reformat(format="yuv420p")
            frame.pts = count
            count += 1
            for packet in s.encode(frame):
                c.mux(packet)

        put(first)
        for arr in frames:
            put(arr)
        for packet in s.encode():
            c.mux(packet)


def write_mp4(path: str, frames, fps: float, **kw) -> int:
    """Encode ``frames`` and write them to ``path`` (atomically); returns the byte count."""
    data = encode_mp4(frames, fps, **kw)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


_FRAME_NUM = re.compile(r"(\d+)\.(?:jpe?g|png|bmp|webp)$", re.IGNORECASE)


def frame_folder_files(folder: str) -> list[str]:
    """Image files of a frame folder, sorted by their trailing number (``..._<n>.jpg``), then by name."""
    names = [n for n in os.listdir(folder) if _FRAME_NUM.search(n)]

    def key(name):
        m = _FRAME_NUM.search(name)
        return (int(m.group(1)), name)

    return [os.path.join(folder, n) for n in sorted(names, key=key)]


def _load_rgb(path: str, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and im.size != size:
            im = im.resize(size, Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def encode_frame_folder(folder: str, fps: float = 1.0, **kw) -> bytes:
    """Encode a folder of frames into one mp4 at ``fps`` (frames of another size are resized to the first's)."""
    files = frame_folder_files(folder)
    if not files:
        raise ValueError(f"no frame images in {folder}")
    first = _load_rgb(files[0], None)
    size = (first.shape[1], first.shape[0])
    frames = (first if i == 0 else _load_rgb(f, size) for i, f in enumerate(files))
    return encode_mp4(frames, fps, **kw)


def encode_gif(data: bytes, default_fps: float = 1.0, **kw) -> tuple[bytes, float]:
    """Re-encode an (animated) GIF as mp4; its rate comes from the frame durations, else ``default_fps``."""
    from PIL import Image, ImageSequence

    with Image.open(io.BytesIO(data)) as im:
        durations, frames = [], []
        for fr in ImageSequence.Iterator(im):
            frames.append(np.asarray(fr.convert("RGB"), dtype=np.uint8))
            durations.append(fr.info.get("duration") or 0)
    if not frames:
        raise ValueError("the GIF has no frames")
    ms = [d for d in durations if d and d > 0]
    fps = 1000.0 / (sum(ms) / len(ms)) if ms else default_fps
    return encode_mp4(frames, fps, **kw), fps
