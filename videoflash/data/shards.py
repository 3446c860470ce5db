"""Shard files: names, the per-set index, the per-shard offsets, and reading samples by seeking.

A shard set is ``{prefix}-000000.tar, {prefix}-000001.tar, ...`` written by ``data_tools.make_shards``,
with beside it:

- ``{prefix}-index.json``, the compact summary every rank reads (one row per shard, never per sample)::

    {"format": 2, "prefix": "k400", "num_shards": 3, "total": 2500, "rejects": 4, "reject_reasons": {...},
     "shards": [{"name": "k400-000000.tar", "num_samples": 1000, "bytes": 1073741000}, ...]}

- ``{prefix}-samples.jsonl``: the per-sample table for people and tools (shard, key, media type,
  duration, fps, frame count, size, bytes); the loader never reads it;
- ``{shard}.offsets.npy`` per shard: an int64 array ``[num_samples, 2]`` of each sample's byte offset
  in the tar (its first member's header) and its length (through its last member's padded data).
  Only a stream that reads from that shard loads it.

Each tar sample holds ``{key}.json`` (the annotation record plus probed metadata) and its media bytes
under their extension (``{key}.mp4``, ``{key}.jpg``, several images as ``{key}.0.jpg``, ...), as
consecutive tar members. A sample is read by one seek and one read of exactly its byte range, so a
reader never touches the bytes of samples it does not use.

Shard sets from before the offsets files (index format 1, or no index at all) still load: the
offsets of a shard are then found by walking its tar headers once (:func:`scan_offsets`: one 512-byte
header read per member, the data is skipped by seeking), and a set without an index is counted the
same way when the loader starts; both say so in the log.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile

import braceexpand
import numpy as np

__all__ = [
    "INDEX_FORMAT",
    "shard_name",
    "index_name",
    "samples_name",
    "offsets_path",
    "expand_shards",
    "index_path_for",
    "read_index",
    "CountingFile",
    "scan_offsets",
    "write_offsets",
    "load_offsets",
    "parse_sample",
]

INDEX_FORMAT = 2
READABLE_INDEX_FORMATS = (1, 2)  # format 1 also carried the per-sample table; its "shards" list is the same


def shard_name(prefix: str, i: int) -> str:
    """``{prefix}-{i:06d}.tar``."""
    return f"{prefix}-{i:06d}.tar"


def index_name(prefix: str) -> str:
    """``{prefix}-index.json``."""
    return f"{prefix}-index.json"


def samples_name(prefix: str) -> str:
    """``{prefix}-samples.jsonl``: the per-sample table (not read by the loader)."""
    return f"{prefix}-samples.jsonl"


def offsets_path(shard: str) -> str:
    """``{shard}.offsets.npy``: where each sample of ``shard`` starts and how long it is."""
    return f"{shard}.offsets.npy"


def expand_shards(spec) -> list[str]:
    """Brace-expand a shard pattern (or a list of patterns; ``::`` separates several in one string)."""
    if isinstance(spec, str):
        parts = [p for p in spec.split("::") if p]
    else:
        parts = list(spec)
    urls = []
    for p in parts:
        urls.extend(braceexpand.braceexpand(str(p)))
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    return urls


_SHARD_RE = re.compile(r"^(?P<prefix>.+)-\d+\.tar$")


def index_path_for(urls: list[str]) -> str | None:
    """The index beside the first shard (``{prefix}-index.json``), if it exists."""
    m = _SHARD_RE.match(os.path.basename(urls[0]))
    if not m:
        return None
    path = os.path.join(os.path.dirname(urls[0]), index_name(m.group("prefix")))
    return path if os.path.exists(path) else None


def read_index(path: str) -> dict:
    """Load an index JSON and check its format version."""
    with open(path) as f:
        idx = json.load(f)
    if idx.get("format") not in READABLE_INDEX_FORMATS:
        raise ValueError(f"{path}: unsupported index format {idx.get('format')!r} (expected one of {READABLE_INDEX_FORMATS})")
    return idx


class CountingFile:
    """A binary file opened for reading that counts the bytes it returns (``bytes_read``).

    Unbuffered, so the count is what was asked of the file system, not what a buffer prefetched."""

    def __init__(self, path: str):
        self.name = path
        self._f = open(path, "rb", buffering=0)
        self.bytes_read = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            data = self._f.readall()
        else:  # an unbuffered read may return less than asked before the end of the file
            parts, left = [], n
            while left > 0:
                got = self._f.read(left)
                if not got:
                    break
                parts.append(got)
                left -= len(got)
            data = b"".join(parts)
        self.bytes_read += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()


def _sample_key(member_name: str) -> str:
    """webdataset's grouping rule: the member name up to the first dot of its last path part."""
    head, sep, base = member_name.rpartition("/")
    return head + sep + base.split(".", 1)[0]


def _blocks(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def scan_offsets(f) -> np.ndarray:
    """``[num_samples, 2]`` (offset, length) of the samples of the tar open as ``f`` (seekable),
    from its headers alone. A damaged header ends the scan there (as Python's tarfile does); a file
    that is not a tar raises ``ValueError``."""
    rows: list[list[int]] = []
    key = None
    try:
        with tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                end = m.offset_data + _blocks(m.size)
                k = _sample_key(m.name)
                if k == key:
                    rows[-1][1] = end - rows[-1][0]
                else:
                    rows.append([m.offset, end - m.offset])
                    key = k
    except tarfile.TarError as exn:  # not a tar at all (a bad first header)
        raise ValueError(f"{getattr(f, 'name', 'tar')}: {type(exn).__name__}: {exn}") from None
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def write_offsets(shard: str) -> np.ndarray:
    """Scan a finished shard's headers and write ``{shard}.offsets.npy`` atomically; returns the offsets."""
    f = CountingFile(shard)
    try:
        offsets = scan_offsets(f)
    finally:
        f.close()
    path = offsets_path(shard)
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, offsets, allow_pickle=False)
    os.replace(tmp, path)
    return offsets


def load_offsets(shard: str) -> np.ndarray | None:
    """The offsets file of ``shard`` (``None`` when it has none or it is unreadable)."""
    path = offsets_path(shard)
    if not os.path.exists(path):
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.dtype.kind != "i":
        return None
    return arr.astype(np.int64, copy=False)


def parse_sample(blob: bytes, url: str) -> dict:
    """One sample's byte range -> ``{"__key__", "__url__", ext: bytes}``; ``ValueError`` if the range
    is not the members of one sample."""
    out: dict = {"__url__": url}
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key = _sample_key(m.name)
                if out.setdefault("__key__", key) != key:
                    raise ValueError(f"members of two samples ({out['__key__']}, {key}) in one record")
                out[m.name[len(key) + 1 :]] = tf.extractfile(m).read()
    except tarfile.TarError as exn:
        raise ValueError(f"{type(exn).__name__}: {exn}") from None
    if "__key__" not in out:
        raise ValueError("no tar member at this offset")
    return out
