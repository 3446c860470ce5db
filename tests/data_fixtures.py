"""Shared helpers and fixtures of the data-room tests (import what you use into the test module).

Everything is real and tiny: mp4 files written with PyAV (libx264) at 32-64 px and a few frames, tar
shards written with webdataset's TarWriter, the small ChatML tokenizer.
"""

from __future__ import annotations

import io
import json
import os
from functools import lru_cache

import numpy as np
import pytest

from data_tools.media import encode_mp4


@pytest.fixture(scope="session")
def tokenizer():
    from videoflash.data.tokenizer import build_chatml_tokenizer

    return build_chatml_tokenizer()


@lru_cache(maxsize=None)
def index_video(num_frames: int, fps: float, size: int = 32, faststart: bool = True) -> bytes:
    """An mp4 whose frame ``i`` shows its index: left half grey ``16 * (i // 16)``, right half grey
    ``16 * (i % 16)`` (up to 256 frames; flat regions survive H.264 and resizing)."""
    if num_frames > 256:
        raise ValueError("index_video encodes at most 256 frames")
    frames = np.zeros((num_frames, size, size, 3), np.uint8)
    half = size // 2
    for i in range(num_frames):
        frames[i, :, :half] = 16 * (i // 16)
        frames[i, :, half:] = 16 * (i % 16)
    return encode_mp4(frames, fps, crf=4, faststart=faststart)


def frame_ids(frames) -> list[int]:
    """The indices shown by :func:`index_video` frames (uint8 ``[N, H, W, 3]``, any size)."""
    arr = np.asarray(frames, dtype=np.float64)
    h, w = arr.shape[1], arr.shape[2]
    ys = slice(h // 4, 3 * h // 4)
    left = arr[:, ys, w // 8 : 3 * w // 8].mean(axis=(1, 2, 3))
    right = arr[:, ys, 5 * w // 8 : 7 * w // 8].mean(axis=(1, 2, 3))
    return [int(round(a / 16)) * 16 + int(round(b / 16)) for a, b in zip(left, right)]


def color_video(num_frames: int = 8, fps: float = 4.0, size: int = 32, rgb=(200, 40, 40)) -> bytes:
    """A small flat-colour mp4."""
    frames = np.zeros((num_frames, size, size, 3), np.uint8)
    frames[:] = rgb
    return encode_mp4(frames, fps)


def png_bytes(h: int, w: int, rgb=(0, 120, 240)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), rgb, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def qa(question: str = "What color is it?", answer: str = "red", visual: bool = True) -> list:
    return [
        {"from": "human", "value": ("<image>\n" if visual else "") + question},
        {"from": "gpt", "value": answer},
    ]


def record(key: str, media_type: str = "video", **extra) -> bytes:
    rec = {"id": key, "media_type": media_type, "conversations": qa(visual=media_type != "text")}
    rec.update(extra)
    return json.dumps(rec).encode()


def write_tar(path: str, samples: list[dict]) -> str:
    """Write raw samples (``__key__`` + extension -> bytes) to a tar shard with webdataset."""
    import webdataset as wds

    with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as sink:
        for s in samples:
            sink.write(s)
    return path


def write_index(out_dir: str, prefix: str, counts: list[int]) -> str:
    """A minimal ``{prefix}-index.json`` (shard sizes only) for hand-made shards."""
    from videoflash.data.shards import INDEX_FORMAT, index_name, shard_name

    idx = {
        "format": INDEX_FORMAT,
        "prefix": prefix,
        "num_shards": len(counts),
        "total": sum(counts),
        "shards": [{"name": shard_name(prefix, i), "num_samples": n, "bytes": 0} for i, n in enumerate(counts)],
    }
    path = os.path.join(out_dir, index_name(prefix))
    with open(path, "w") as f:
        json.dump(idx, f)
    return path


def tar_record_bytes(path: str) -> dict:
    """``{sample key: bytes its members take in the tar}`` (headers and 512-byte blocks), read with the
    standard library: what reading exactly that sample costs."""
    import tarfile

    out: dict = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key = m.name.split(".", 1)[0]
            out[key] = out.get(key, 0) + (m.offset_data - m.offset) + -(-m.size // 512) * 512
    return out
