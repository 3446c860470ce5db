"""Reading LLaVA-NeXT annotation files and data-mix YAMLs (videochat_flash.md sections 4.1 and 5.1).

An annotation file is JSON (a list of records) or JSONL (one record a line). A record is a video
(``video``: a file, or a folder of frames), an image (``image``: a path or a list of paths) or text
only, with ``conversations`` as ``from``/``value`` or ``role``/``content`` turns and optional
``start``/``end`` seconds.

A data mix is a YAML list of sources (either the list itself or under ``datasets:``)::

    datasets:
      - json_path: annotations/k400.jsonl     # .json or .jsonl
        sampling_strategy: first:25%          # all | first:N | first:P% | firstK:N|P% | end:N|P%
        data_root: /data/k400                 # prefixed onto every media path
        name: k400                            # optional: the shard prefix (default: the file's stem)
        video_read_type: img                  # optional: img (folder of frames) | gif | decord (default)
        frames_fps: 1.0                       # optional: rate of a folder of frames (default 1.0)
        media_type: video                     # optional: video | image | text (default: per record)

``firstK:X`` takes the K-th chunk of size X (``first2:25%`` is the second quarter); ``random`` is
refused, as in VideoChat-Flash, because it would not be reproducible.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import yaml

__all__ = ["MixEntry", "Reject", "read_annotation_file", "apply_sampling_strategy", "load_mix", "parse_size"]


@dataclass
class Reject:
    """A record that does not make it into a shard."""

    source: str
    location: str
    reason: str
    message: str
    record_id: str | None = None
    media: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class MixEntry:
    """One source of a data mix."""

    json_path: str
    data_root: str = ""
    sampling_strategy: str = "all"
    name: str | None = None
    video_read_type: str | None = None
    frames_fps: float = 1.0
    media_type: str | None = None

    @property
    def prefix(self) -> str:
        base = self.name or os.path.splitext(os.path.basename(self.json_path))[0]
        return re.sub(r"[^A-Za-z0-9_-]+", "_", base)


def read_annotation_file(path: str) -> tuple[list[tuple[str, dict]], list[Reject]]:
    """Records of a JSON or JSONL file as ``(location, record)`` pairs, and the rejected lines.

    A malformed JSONL line (or a non-object record) is rejected with reason ``bad_json`` and the rest
    is kept; a JSON file that does not parse at all is one reject covering the whole file.
    """
    records, rejects = [], []
    with open(path, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8", errors="replace")
    stripped = text.lstrip()
    if path.endswith(".jsonl") or (stripped and stripped[0] == "{" and not path.endswith(".json")):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            loc = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exn:
                rejects.append(Reject(path, loc, "bad_json", f"line {n}: {exn}"))
                continue
            if not isinstance(rec, dict):
                rejects.append(Reject(path, loc, "bad_json", f"line {n}: a record must be an object"))
                continue
            records.append((loc, rec))
        return records, rejects
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exn:
        return [], [Reject(path, path, "bad_json", f"the file does not parse: {exn}")]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        return [], [Reject(path, path, "bad_json", "expected a list of records")]
    for n, rec in enumerate(data):
        loc = f"{path}[{n}]"
        if not isinstance(rec, dict):
            rejects.append(Reject(path, loc, "bad_json", f"record {n} is not an object"))
            continue
        records.append((loc, rec))
    return records, rejects


_STRATEGY = re.compile(r"^(first|end)(\d*):(\d+(?:\.\d+)?)(%?)$")


def apply_sampling_strategy(records: list, strategy: str | None) -> list:
    """Apply a VideoChat-Flash ``sampling_strategy`` to a list (kept in file order).

    ``all``; ``first:N`` / ``first:P%`` (the first N, or ceil(P% of len)); ``firstK:X`` (the K-th chunk
    of that size: ``records[(K-1)*n : K*n]``); ``end:N`` / ``end:P%`` (the last ones).
    """
    s = (strategy or "all").strip()
    if s == "all":
        return list(records)
    if s.startswith("random"):
        raise ValueError(f"sampling_strategy {s!r}: 'random' is not supported (not reproducible); use first/end")
    m = _STRATEGY.match(s)
    if not m:
        raise ValueError(f"unknown sampling_strategy {s!r}; expected all, first:N, first:P%, firstK:N|P%, end:N|P%")
    kind, chunk, amount, pct = m.group(1), m.group(2), float(m.group(3)), m.group(4)
    n = math.ceil(amount * len(records) / 100) if pct else int(amount)
    if kind == "end":
        if chunk:
            raise ValueError(f"sampling_strategy {s!r}: chunks are only defined for 'first'")
        return list(records[len(records) - n :]) if n > 0 else []
    k = int(chunk) if chunk else 1
    if k < 1:
        raise ValueError(f"sampling_strategy {s!r}: the chunk number starts at 1")
    return list(records[(k - 1) * n : k * n])


def load_mix(path: str) -> list[MixEntry]:
    """Parse a data-mix YAML; relative ``json_path``/``data_root`` are relative to the YAML's folder."""
    with open(path) as f:
        doc = yaml.safe_load(f)
    items = doc.get("datasets") if isinstance(doc, dict) else doc
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a list of sources (or 'datasets:' with a list)")
    base = os.path.dirname(os.path.abspath(path))
    known = set(MixEntry.__dataclass_fields__)
    entries = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "json_path" not in item:
            raise ValueError(f"{path}: source {i} needs a 'json_path'")
        unknown = set(item) - known
        if unknown:
            raise ValueError(f"{path}: source {i} has unknown keys {sorted(unknown)}; known: {sorted(known)}")
        e = MixEntry(**item)
        apply_sampling_strategy([], e.sampling_strategy)  # validate early
        if not os.path.isabs(e.json_path):
            e.json_path = os.path.join(base, e.json_path)
        if e.data_root and not os.path.isabs(e.data_root) and "://" not in e.data_root:
            e.data_root = os.path.join(base, e.data_root)
        entries.append(e)
    names = [e.prefix for e in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{path}: several sources share the shard prefix {dup}; give them distinct 'name's")
    return entries


def parse_size(text) -> int:
    """``"512MB"``, ``"1.5GB"``, ``"64k"`` or a plain integer -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse a size from {text!r}")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)
