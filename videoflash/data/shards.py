"""Shard files: names, the per-set index, and reading samples out of tar shards.

A shard set is ``{prefix}-000000.tar, {prefix}-000001.tar, ...`` with ``{prefix}-index.json`` beside it
(written by ``data_tools.make_shards``)::

    {"format": 1, "prefix": "k400", "num_shards": 3, "total": 2500,
     "shards": [{"name": "k400-000000.tar", "num_samples": 1000, "bytes": 1073741000}, ...],
     "samples": [{"key": "...", "shard": 0, "media_type": "video", "duration": 12.5, "fps": 30.0,
                  "num_frames": 375, "width": 640, "height": 360, "bytes": 123456}, ...]}

Each tar sample holds ``{key}.json`` (the annotation record plus probed metadata) and its media bytes
under their extension (``{key}.mp4``, ``{key}.jpg``, several images as ``{key}.0.jpg``, ...).
Reading uses webdataset's tar iterators with an error handler, so a damaged tar skips what it cannot
read instead of stopping the stream.
"""

from __future__ import annotations

import json
import os
import re

import braceexpand

__all__ = [
    "INDEX_FORMAT",
    "shard_name",
    "index_name",
    "expand_shards",
    "index_path_for",
    "read_index",
    "iter_tar_samples",
]

INDEX_FORMAT = 1


def shard_name(prefix: str, i: int) -> str:
    """``{prefix}-{i:06d}.tar``."""
    return f"{prefix}-{i:06d}.tar"


def index_name(prefix: str) -> str:
    """``{prefix}-index.json``."""
    return f"{prefix}-index.json"


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
    if idx.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: unsupported index format {idx.get('format')!r} (expected {INDEX_FORMAT})")
    return idx


def iter_tar_samples(url: str, handler):
    """Samples (dicts of ``__key__``, ``__url__`` and raw bytes per extension) of one tar shard.

    ``handler(exn) -> bool`` decides on errors (True: skip and continue); the stream is closed at the end.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

    opened = url_opener([{"url": url}], handler=handler)
    files = tar_file_expander(opened, handler=handler)
    try:
        yield from group_by_keys(files, handler=handler)
    finally:
        files.close()
        opened.close()
