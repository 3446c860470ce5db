"""LLaVA-NeXT annotations + media -> WebDataset tar shards with an index.

Usage::

    # one annotation set (JSON or JSONL; several files are concatenated)
    python -m data_tools.make_shards --annotations data/synth/train.jsonl --media-root data/synth \\
        --out shards/synth --prefix synth-train --shard-size 256MB

    # a data mix (videochat_flash.md section 4.1): one shard set per source + a loader source list
    python -m data_tools.make_shards --mix configs/mix.yaml --out shards/mix

    # the same job split over 4 machines (same options, one --part each), then the index
    python -m data_tools.make_shards --annotations ... --out shards/synth --part 0/4   # ... 3/4
    python -m data_tools.make_shards --annotations ... --out shards/synth --merge

What it writes under ``--out`` for each set:

- ``{prefix}-000000.tar ...``: each sample is ``{key}.json`` (the record plus probed ``media_type``,
  ``duration``, ``fps``, ``num_frames``, ``width``, ``height``) and the media bytes unchanged under their
  extension (``{key}.mp4``, ``{key}.jpg``, several images as ``{key}.0.jpg``, ``{key}.1.png``). A folder
  of frames (or a GIF) becomes one H.264 mp4 at its frame rate.
- ``{prefix}-index.json``: the compact summary the loader reads: per shard its name, samples and
  bytes; the total; the reject count by reason (never a per-sample table).
- ``{shard}.offsets.npy`` per shard: each sample's byte offset and length in the tar, so that the
  loader reads a sample by one seek (:mod:`videoflash.data.shards`).
- ``{prefix}-samples.jsonl``: per sample its shard, key, media type, duration, fps, frame count,
  width/height and byte size, for people and tools.
- ``{prefix}-rejects.jsonl``: every record left out, with the reason (``bad_json``, ``missing_file``,
  ``empty_file``, ``bad_video``, ``bad_image``, ``bad_span``, ``bad_conversation``, ``bad_record``,
  ``decoder_crash``, ``decoder_timeout``) and the job goes on.
- with ``--mix``: ``sources.yaml``, the list of shard sets for ``videoflash.data`` (name, shards, weight).

Every video is opened and decoded (``--probe sparse``: 16 frames spread over the video, the last one
included; ``--probe full``: every frame) in ``--workers`` supervised child processes
(:mod:`videoflash.data.isolation`), with a progress bar. A file that kills its probe process (a
segfault or abort inside the decoder) is rejected as ``decoder_crash`` naming the signal, one whose
probe runs past ``--probe-timeout`` seconds as ``decoder_timeout``; the process is replaced and the
job goes on. ``--video-backend`` names the decoder that probes (the loader's ``data.video_backend``;
default ``auto``: torchcodec when it loads, else decord). Shards are planned from the annotation order and file sizes before any probing, written
atomically, and each finished shard leaves a small ``.done.json`` beside it: a re-run skips shards
whose plan is unchanged.

**Parts.** ``--part I/N`` plans every shard (the plan only reads annotations and file sizes) but
builds only the shards ``i`` with ``i % N == I``, each with its ``.done.json``; it writes no index.
N parts can run on N machines into one shared folder; ``--merge`` (the same options, no part) then
checks that every shard is done under the current plan and writes the index, the samples table and
the rejects from the done files: the same files as one run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from videoflash.data.conversation import normalize_conversation
from videoflash.data.decode import IMAGE_EXTENSIONS, MediaError, probe_image, probe_video
from videoflash.data.isolation import IsolationError, run_ordered
from videoflash.data.sampling import span_to_frames
from videoflash.data.shards import INDEX_FORMAT, index_name, offsets_path, samples_name, shard_name, write_offsets

from .annotations import MixEntry, Reject, apply_sampling_strategy, load_mix, parse_size, read_annotation_file
from .media import encode_frame_folder, encode_gif

__all__ = ["ShardJob", "build_shard_set", "merge_shard_set", "build_mix", "main"]

_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass
class _Item:
    """A planned sample: one record and the media files it needs."""

    key: str
    location: str
    record: dict
    media_type: str  # video | image | text
    media: list = field(default_factory=list)  # [(path, ext, convert)]; convert: None | "frames" | "gif"
    est_bytes: int = 0


@dataclass
class ShardJob:
    """Options of one shard set."""

    annotations: list[str]
    media_root: str
    out_dir: str
    prefix: str
    shard_bytes: int = 1 << 30
    max_samples: int = 100_000
    sampling_strategy: str = "all"
    video_read_type: str | None = None
    frames_fps: float = 1.0
    media_type: str | None = None
    probe: str = "sparse"
    workers: int | None = None
    probe_timeout: float = 600.0
    video_backend: str = "auto"  # the decoder that probes videos (videoflash.model.video_io.BACKENDS)
    progress: bool = True
    part: tuple[int, int] = (0, 1)  # (I, N): build only the shards i with i % N == I


# --------------------------------------------------------------------------------------------------
# planning (main process, no decoding)


def _media_type(rec: dict, forced: str | None) -> str:
    if forced:
        return forced
    if "video" in rec:
        return "video"
    if "image" in rec:
        return "image"
    return "text"


def _media_paths(rec: dict, field_name: str, root: str) -> list[str] | str:
    """The paths of ``rec[field_name]`` (a video: one path; images: one path or a list of them), or
    the message of a ``bad_record`` reject: a missing or null field, a list where a string belongs,
    a non-string entry, an empty path, or a path that is the media root itself."""
    if field_name not in rec:
        return f"no '{field_name}' field (the record is of media type {field_name})"
    value = rec[field_name]
    if value is None:
        return f"'{field_name}' is null (leave the field out for a text-only record)"
    if field_name == "video" and not isinstance(value, str):
        return f"'video' must be one path (a string), got {type(value).__name__} {str(value)[:80]}"
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not paths:
        return f"'{field_name}' must be a path or a non-empty list of paths, got {type(value).__name__} {str(value)[:80]}"
    for k, p in enumerate(paths):
        where = f"'{field_name}'" + (f"[{k}]" if not isinstance(value, str) else "")
        if not isinstance(p, str):
            return f"{where} must be a path (a string), got {type(p).__name__} {str(p)[:80]}"
        if not p.strip():
            return f"{where} is an empty path"
        if root and os.path.normpath(_resolve(root, p)) == os.path.normpath(root):
            return f"{where} ({p!r}) is the media root itself"
    return paths


def _resolve(root: str, path: str) -> str:
    return path if os.path.isabs(path) or not root else os.path.join(root, path)


def _plan_item(i: int, loc: str, rec: dict, job: ShardJob, source: str) -> _Item | Reject:
    """Check what can be checked without decoding: fields, conversation, files present and non-empty."""
    rid = str(rec.get("id")) if rec.get("id") is not None else None
    key = f"{i:08d}" + (f"_{_KEY_SAFE.sub('_', rid)[:80]}" if rid else "")
    try:
        normalize_conversation(rec.get("conversations"))
    except ValueError as exn:
        return Reject(source, loc, "bad_conversation", str(exn), rid)
    mtype = _media_type(rec, job.media_type)
    item = _Item(key, loc, rec, mtype)
    if mtype == "text":
        return item
    paths = _media_paths(rec, "video" if mtype == "video" else "image", job.media_root)
    if isinstance(paths, str):
        return Reject(source, loc, "bad_record", paths, rid)
    for p in paths:
        full = _resolve(job.media_root, p)
        if not os.path.exists(full):
            return Reject(source, loc, "missing_file", f"no such file: {full}", rid, p)
        ext = os.path.splitext(full)[1].lower().lstrip(".")
        convert = None
        if mtype == "video" and (os.path.isdir(full) or job.video_read_type in ("img", "frame")):
            if not os.path.isdir(full):
                return Reject(source, loc, "bad_record", f"video_read_type img needs a folder: {full}", rid, p)
            convert, ext = "frames", "mp4"
            size = sum(e.stat().st_size for e in os.scandir(full) if e.is_file())
        elif mtype == "video" and (ext == "gif" or job.video_read_type == "gif"):
            convert, ext = "gif", "mp4"
            size = os.path.getsize(full)
        else:
            if os.path.isdir(full):
                return Reject(source, loc, "bad_record", f"expected a file, got a folder: {full}", rid, p)
            size = os.path.getsize(full)
            if mtype == "image" and ext not in IMAGE_EXTENSIONS:
                ext = ext or "jpg"
            ext = {"jpeg": "jpg"}.get(ext, ext) or "bin"
        if size == 0:
            return Reject(source, loc, "empty_file", f"zero-length media: {full}", rid, p)
        item.media.append((full, ext, convert))
        item.est_bytes += _tar_bytes(size)
    return item


def _tar_bytes(size: int) -> int:
    """Bytes a member of ``size`` bytes takes in a tar: a 512-byte header plus 512-byte blocks."""
    return 512 + -(-size // 512) * 512


def _plan(job: ShardJob, source: str) -> tuple[list[list[_Item]], list[Reject]]:
    """Read the annotations, apply the sampling strategy, check files, cut into shards."""
    records, rejects = [], []
    for path in job.annotations:
        recs, rej = read_annotation_file(path)
        records.extend(recs)
        rejects.extend(rej)
    records = apply_sampling_strategy(records, job.sampling_strategy)
    items = []
    for i, (loc, rec) in enumerate(records):
        got = _plan_item(i, loc, rec, job, source)
        (rejects if isinstance(got, Reject) else items).append(got)
    shards, cur, cur_bytes = [], [], 0
    for it in items:
        size = it.est_bytes + _tar_bytes(len(json.dumps(it.record)) + 200)
        if cur and (cur_bytes + size > job.shard_bytes or len(cur) >= job.max_samples):
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(it)
        cur_bytes += size
    if cur or not shards:
        shards.append(cur)
    return shards, rejects


def _plan_hash(items: list[_Item], job: ShardJob) -> str:
    h = hashlib.sha1()
    h.update(json.dumps([job.probe, job.frames_fps, job.video_read_type, job.media_type]).encode())
    for it in items:
        h.update(it.key.encode())
        h.update(json.dumps(it.record, sort_keys=True).encode())
        for path, ext, convert in it.media:
            st = os.stat(path)
            h.update(f"{path}|{ext}|{convert}|{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# probing (worker processes)


def _probe(args) -> dict:
    """Load and probe one item's media; returns the sample (or the reject) as plain data."""
    item, probe_full, frames_fps, *rest = args
    backend = rest[0] if rest else "auto"
    rec = dict(item.record)
    out = {"key": item.key, "files": []}
    try:
        if item.media_type == "video":
            path, ext, convert = item.media[0]
            if convert == "frames":
                data = encode_frame_folder(path, fps=frames_fps)
                rec["converted_from"] = "frames"
            elif convert == "gif":
                with open(path, "rb") as f:
                    data, _ = encode_gif(f.read(), default_fps=frames_fps)
                rec["converted_from"] = "gif"
            else:
                with open(path, "rb") as f:
                    data = f.read()
            if not data:
                raise MediaError("empty_file", f"zero-length media: {path}")
            meta = probe_video(data, full=probe_full, backend=backend)
            if rec.get("start") is not None or rec.get("end") is not None:
                try:
                    span_to_frames(meta["num_frames"], meta["fps"], rec.get("start"), rec.get("end"))
                except ValueError as exn:
                    raise MediaError("bad_span", str(exn)) from exn
            rec.update(media_type="video", **meta)
            out["files"].append((ext, data, path if convert is None else None))
        elif item.media_type == "image":
            sizes = []
            many = len(item.media) > 1
            for k, (path, ext, _) in enumerate(item.media):
                with open(path, "rb") as f:
                    data = f.read()
                if not data:
                    raise MediaError("empty_file", f"zero-length media: {path}")
                sizes.append(probe_image(data))
                out["files"].append((f"{k}.{ext}" if many else ext, None, path))
            rec.update(media_type="image", width=sizes[0]["width"], height=sizes[0]["height"], num_images=len(sizes))
            if many:
                rec["image_sizes"] = [[s["width"], s["height"]] for s in sizes]
        else:
            rec["media_type"] = "text"
        rec["media_files"] = [f[0] for f in out["files"]]
        out["record"] = rec
    except MediaError as exn:
        out["reject"] = (exn.reason, str(exn))
    except OSError as exn:
        out["reject"] = ("unreadable", f"{type(exn).__name__}: {exn}")
    except Exception as exn:  # anything else a decoder throws: reject the sample, keep the job going
        out["reject"] = ("probe_error", f"{type(exn).__name__}: {exn}")
    return out


def _media_bytes(files):
    for name, data, path in files:
        if data is None:
            with open(path, "rb") as f:
                data = f.read()
        yield name, data


# --------------------------------------------------------------------------------------------------
# writing


def _write_shard(path: str, samples: list[tuple[str, dict, list]]) -> int:
    """Write ``samples`` ([(key, record, files)]) to ``path`` atomically, then its offsets file (from
    the finished tar's headers, so that it describes the bytes on disk); returns the byte size."""
    import webdataset as wds

    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        with wds.TarWriter(f, encoder=False, mtime=0) as sink:
            for key, rec, files in samples:
                s = {"__key__": key, "json": json.dumps(rec, sort_keys=True).encode()}
                for name, data in _media_bytes(files):
                    s[name] = data
                sink.write(s)
    os.replace(tmp, path)
    offsets = write_offsets(path)
    if len(offsets) != len(samples):
        raise RuntimeError(f"{path}: wrote {len(samples)} samples but its headers show {len(offsets)}")
    return os.path.getsize(path)


def _atomic_json(path: str, obj, lines: bool = False):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        if lines:
            for row in obj:
                f.write(json.dumps(row, sort_keys=True) + "\n")
        else:
            json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _done_path(job: ShardJob, i: int) -> str:
    return os.path.join(job.out_dir, shard_name(job.prefix, i) + ".done.json")


def _planned(job: ShardJob, source: str):
    """The plan of a set: ``([(i, items, plan hash, done record or None)], rejects of planning)``; a
    shard's done record counts only if its tar exists and its plan is unchanged."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", job.prefix):
        raise ValueError(f"prefix {job.prefix!r}: use letters, digits, '_', '-', '.'")
    shards, rejects = _plan(job, source)
    plan = []
    for i, items in enumerate(shards):
        h = _plan_hash(items, job)
        done = None
        tar = os.path.join(job.out_dir, shard_name(job.prefix, i))
        if os.path.exists(_done_path(job, i)) and os.path.exists(tar):
            with open(_done_path(job, i)) as f:
                done = json.load(f)
            if done.get("plan") != h:
                done = None
        plan.append((i, items, h, done))
    return plan, rejects


def _add_missing_offsets(job: ShardJob, done_shards) -> None:
    """Offsets files for finished shards of a set made before they existed (from the tar headers)."""
    for i in done_shards:
        tar = os.path.join(job.out_dir, shard_name(job.prefix, i))
        if not os.path.exists(offsets_path(tar)):
            write_offsets(tar)


def build_shard_set(job: ShardJob, source: str | None = None) -> dict:
    """Build (or finish) one shard set, or this job's part of it; returns the index (also written to
    ``{prefix}-index.json``), or for a part of several a summary of what it built. Run on a set made
    before offsets files and the compact index, it adds both without rebuilding a shard."""
    source = source or job.prefix
    part, parts = job.part
    if not 0 <= part < parts:
        raise ValueError(f"part {part}/{parts}: need 0 <= I < N")
    os.makedirs(job.out_dir, exist_ok=True)
    plan, rejects = _planned(job, source)
    mine = [(i, items, h, d) for i, items, h, d in plan if i % parts == part]
    pending = [(i, items, h) for i, items, h, d in mine if d is None]
    _add_missing_offsets(job, [i for i, _, _, d in mine if d is not None])
    n_skip = sum(len(items) for _, items, _, d in mine if d is not None)
    workers = job.workers if job.workers is not None else min(8, os.cpu_count() or 1)
    todo = [(it, job.probe == "full", job.frames_fps, job.video_backend) for _, items, _ in pending for it in items]
    bar = tqdm(
        total=len(todo) + n_skip, initial=n_skip, desc=f"shards {job.prefix}", unit="sample", disable=not job.progress
    )
    results = _run(todo, workers, job.probe_timeout)
    n_rej = 0
    for i, items, h in pending:
        samples, shard_rejects = [], []
        for it in items:
            out = next(results)
            bar.update()
            if isinstance(out, IsolationError):
                out = {"key": it.key, "reject": (out.reason, f"{out} (probing {it.media[0][0] if it.media else it.key})")}
            if "reject" in out:
                reason, msg = out["reject"]
                media = it.media[0][0] if it.media else None
                shard_rejects.append(Reject(source, it.location, reason, msg, it.record.get("id"), media).to_json())
                n_rej += 1
                bar.set_postfix(rejects=n_rej + len(rejects))
            else:
                samples.append((out["key"], out["record"], out["files"]))
        tar = os.path.join(job.out_dir, shard_name(job.prefix, i))
        nbytes = _write_shard(tar, samples)
        entries = []
        for key, rec, files in samples:
            size = sum(len(d) if d is not None else os.path.getsize(p) for _, d, p in files)
            entries.append(
                {
                    "key": key,
                    "media_type": rec["media_type"],
                    "duration": rec.get("duration"),
                    "fps": rec.get("fps"),
                    "num_frames": rec.get("num_frames"),
                    "width": rec.get("width"),
                    "height": rec.get("height"),
                    "num_images": rec.get("num_images"),
                    "bytes": size,
                }
            )
        done = {"plan": h, "name": shard_name(job.prefix, i), "bytes": nbytes, "samples": entries, "rejects": shard_rejects}
        _atomic_json(_done_path(job, i), done)
        plan[i] = (i, items, h, done)
    results.close()  # ends the probe processes
    bar.close()
    if parts > 1:
        built = [i for i, _, _, _ in mine]
        return {"prefix": job.prefix, "part": [part, parts], "shards": built, "num_shards": len(plan),
                "total": sum(len(plan[i][3]["samples"]) for i in built)}  # fmt: skip
    return _write_index(job, source, plan, rejects)


def merge_shard_set(job: ShardJob, source: str | None = None) -> dict:
    """Write the index of a set built in parts (``--part I/N``) from its done files; every shard must
    be done under the current plan (the error names those that are not)."""
    source = source or job.prefix
    plan, rejects = _planned(job, source)
    missing = [shard_name(job.prefix, i) for i, _, _, done in plan if done is None]
    _add_missing_offsets(job, [i for i, _, _, done in plan if done is not None])
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(plan)} shards of {job.prefix} are not built under the current "
                           f"plan (run their --part again): {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")  # fmt: skip
    return _write_index(job, source, plan, rejects)


def _write_index(job: ShardJob, source: str, plan, rejects) -> dict:
    """``{prefix}-index.json`` (compact), ``{prefix}-samples.jsonl`` and ``{prefix}-rejects.jsonl``."""
    index = {
        "format": INDEX_FORMAT,
        "prefix": job.prefix,
        "source": source,
        "num_shards": len(plan),
        "shards": [],
        "total": 0,
        "rejects": 0,
    }
    rows = []
    all_rejects = [r.to_json() for r in rejects]
    for i, _, _, done in plan:
        index["shards"].append({"name": done["name"], "num_samples": len(done["samples"]), "bytes": done["bytes"]})
        for s in done["samples"]:
            rows.append({"shard": i, **{k: v for k, v in s.items() if v is not None}})
        all_rejects.extend(done["rejects"])
    index["total"] = len(rows)
    index["rejects"] = len(all_rejects)
    index["reject_reasons"] = _count(r["reason"] for r in all_rejects)
    _atomic_json(os.path.join(job.out_dir, samples_name(job.prefix)), rows, lines=True)
    _atomic_json(os.path.join(job.out_dir, f"{job.prefix}-rejects.jsonl"), all_rejects, lines=True)
    _atomic_json(os.path.join(job.out_dir, index_name(job.prefix)), index)
    return index


def _count(values) -> dict:
    out = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def _run(todo, workers: int, timeout: float | None, probe=None):
    """Probe results in the order of ``todo`` (a generator) from ``workers`` supervised probe
    processes; a probe whose process died or ran past ``timeout`` gives its :class:`IsolationError`.
    ``probe`` (default :func:`_probe`) is what the processes run on each task."""
    return run_ordered(probe or _probe, [(t,) for t in todo], max(1, workers), timeout, name="probe process")


def shard_pattern(out_dir: str, prefix: str, num_shards: int) -> str:
    """The brace pattern of a set, e.g. ``out/k400-{000000..000002}.tar``."""
    if num_shards == 1:
        return os.path.join(out_dir, shard_name(prefix, 0))
    return os.path.join(out_dir, f"{prefix}-{{{0:06d}..{num_shards - 1:06d}}}.tar")


def build_mix(mix_path: str, out_dir: str, merge: bool = False, **opts) -> list[dict]:
    """Build one shard set per source of a mix YAML and write ``sources.yaml`` for the loader; with
    ``part=(I, N)``, N > 1, only this part of every set (no index, no ``sources.yaml``: the list of
    part summaries is returned); with ``merge=True``, the indexes of sets built in parts."""
    import yaml

    entries: list[MixEntry] = load_mix(mix_path)
    sources = []
    for e in entries:
        job = ShardJob(
            annotations=[e.json_path],
            media_root=e.data_root,
            out_dir=out_dir,
            prefix=e.prefix,
            sampling_strategy=e.sampling_strategy,
            video_read_type=e.video_read_type,
            frames_fps=e.frames_fps,
            media_type=e.media_type,
            **opts,
        )
        idx = merge_shard_set(job, source=e.prefix) if merge else build_shard_set(job, source=e.prefix)
        if job.part[1] > 1 and not merge:
            sources.append(idx)
            continue
        sources.append(
            {
                "name": e.prefix,
                "shards": shard_pattern(out_dir, e.prefix, idx["num_shards"]),
                "weight": 1.0,
                "num_samples": idx["total"],
            }
        )
    if opts.get("part", (0, 1))[1] > 1 and not merge:
        return sources
    tmp = os.path.join(out_dir, "sources.yaml.tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump({"sources": sources}, f, sort_keys=False)
    os.replace(tmp, os.path.join(out_dir, "sources.yaml"))
    return sources


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_tools.make_shards",
        description="LLaVA annotations + media -> WebDataset tar shards with an index.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--annotations", nargs="+", help="JSON/JSONL annotation files (one shard set)")
    src.add_argument("--mix", help="a data-mix YAML (one shard set per source)")
    p.add_argument("--media-root", default="", help="prefixed onto relative media paths (--annotations)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--prefix", default=None, help="shard name prefix (--annotations; default: first file's stem)")
    p.add_argument("--shard-size", default="1GB", help="target bytes per shard (e.g. 512MB)")
    p.add_argument("--max-samples-per-shard", type=int, default=100_000)
    p.add_argument("--sampling-strategy", default="all", help="all | first:N | first:P%% | end:N ... (--annotations)")
    p.add_argument("--video-read-type", default=None, choices=[None, "decord", "img", "gif"], help="(--annotations)")
    p.add_argument("--frames-fps", type=float, default=1.0, help="rate of folders of frames (--annotations)")
    p.add_argument("--probe", choices=["sparse", "full"], default="sparse", help="decode 16 frames or all")
    p.add_argument("--workers", type=int, default=None, help="probing processes (default: up to 8)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--part", default=None, metavar="I/N", help="build only shards i with i %% N == I (no index)")
    how.add_argument("--merge", action="store_true", help="write the index of a set built with --part")
    p.add_argument("--probe-timeout", type=float, default=600.0,
                   help="seconds one sample's probe may take; a slower one is rejected (decoder_timeout)")  # fmt: skip
    p.add_argument("--video-backend", choices=["auto", "torchcodec", "decord", "pyav"], default="auto",
                   help="the decoder that probes videos (use the loader's data.video_backend; auto: torchcodec "
                        "when it loads, else decord)")  # fmt: skip
    a = p.parse_args(argv)
    t0 = time.time()
    part = (0, 1)
    if a.part is not None:
        try:
            part = tuple(int(x) for x in a.part.split("/"))
            assert len(part) == 2 and 0 <= part[0] < part[1]
        except (ValueError, AssertionError):
            p.error(f"--part {a.part}: expected I/N with 0 <= I < N, e.g. 0/4")
    common = dict(
        shard_bytes=parse_size(a.shard_size), max_samples=a.max_samples_per_shard, probe=a.probe, workers=a.workers,
        part=part,
        probe_timeout=a.probe_timeout, video_backend=a.video_backend,
    )  # fmt: skip
    if a.mix:
        sources = build_mix(a.mix, a.out, merge=a.merge, **common)
        if part[1] > 1:
            print(f"part {part[0]}/{part[1]}: {sum(len(s['shards']) for s in sources)} shards built "
                  f"({time.time() - t0:.1f}s); run --merge when every part is done")  # fmt: skip
            return 0
        total = sum(s["num_samples"] for s in sources)
        print(f"{len(sources)} sources, {total} samples -> {os.path.join(a.out, 'sources.yaml')} ({time.time() - t0:.1f}s)")
        return 0
    prefix = a.prefix or _KEY_SAFE.sub("_", os.path.splitext(os.path.basename(a.annotations[0]))[0])
    job = ShardJob(
        annotations=a.annotations,
        media_root=a.media_root,
        out_dir=a.out,
        prefix=prefix,
        sampling_strategy=a.sampling_strategy,
        video_read_type=a.video_read_type,
        frames_fps=a.frames_fps,
        **common,
    )
    try:
        idx = merge_shard_set(job) if a.merge else build_shard_set(job)
    except RuntimeError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    if part[1] > 1:
        print(f"part {part[0]}/{part[1]}: {len(idx['shards'])} of {idx['num_shards']} shards, {idx['total']} samples "
              f"({time.time() - t0:.1f}s); run --merge when every part is done")  # fmt: skip
        return 0
    print(
        f"{idx['total']} samples in {idx['num_shards']} shards, {idx['rejects']} rejected "
        f"{json.dumps(idx['reject_reasons'])} -> {shard_pattern(a.out, prefix, idx['num_shards'])} "
        f"({time.time() - t0:.1f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
