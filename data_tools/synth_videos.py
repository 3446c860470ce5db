"""A deterministic synthetic video corpus whose answers are known.

``python -m data_tools.synth_videos --out data/synth`` writes real H.264 mp4 files (PyAV, libx264) and
LLaVA annotations, ``train.jsonl`` and ``heldout.jsonl``, plus ``meta.json`` (tasks, answer choices and
chance levels) and a ``README.md``. Everything is a function of ``--seed`` and the options: the same
command writes the same bytes.

Short clips (default 4 s at 8 fps, 64x64) show one coloured shape on a dark background and ask one of

- ``color``: "What color is the shape?"  red / green / blue / yellow          (chance 1/4)
- ``shape``: "What shape is shown?"  square / circle / triangle               (chance 1/3)
- ``motion``: "Which direction does the shape move?"  left / right / up / down (chance 1/4)
- ``count``: "How many times does the shape flash?"  one / two / three         (chance 1/3)

For ``count`` the clip is cut into one-second slots and the shape is visible during the first half of
the chosen slots only, so that 4, 8 or more uniformly sampled frames (midpoints) see every flash once.

Long videos (default 60-120 s at 2 fps) show a grey square drifting and bouncing; a "needle" -- a
coloured shape -- appears once for ``--needle-seconds`` at a random time, and the question comes after
the video:

- ``needle_color``: "A colored shape appeared briefly in the video. What color was it?"   (chance 1/4)
- ``needle_time``: "When did the colored shape appear: beginning, middle, or end?"         (chance 1/3)

The needle lies well inside one third of the video (a margin of 5% of the duration on each side).
Uniform sampling sees it when frames are at most ``--needle-seconds`` apart: about 1 fps
(``dynamic_fps1``) always does; a 120 s video needs at least 30 frames with the default 4 s needle.
Optional still images (``--images N``) ask ``image_color`` / ``image_shape``. A shape's half-size is
0.17 of the frame's shorter side, or, with ``--shape-scale LO HI``, drawn per video in that range (a
model that has seen shapes at many sizes carries over to a higher resolution better).

Every record carries ``task``, ``answer`` and ``choices`` (and ``needle_start``/``needle_end`` for long
videos), so an evaluator can score answers and report the chance level of each task.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

try:  # run as `python -m data_tools.synth_videos` or imported
    from .media import write_mp4
except ImportError:  # pragma: no cover - executed as a plain script
    from data_tools.media import write_mp4

__all__ = ["SynthConfig", "TASKS", "generate_corpus", "render_short", "render_long", "main"]

VERSION = 1

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
COUNTS = ("one", "two", "three")
THIRDS = ("beginning", "middle", "end")
BACKGROUND = (30, 30, 30)
DISTRACTOR = (130, 130, 130)

TASKS = {
    "color": {"kind": "short", "question": "What color is the shape?", "choices": list(COLORS)},
    "shape": {"kind": "short", "question": "What shape is shown?", "choices": list(SHAPES)},
    "motion": {"kind": "short", "question": "Which direction does the shape move?", "choices": list(DIRECTIONS)},
    "count": {"kind": "short", "question": "How many times does the shape flash?", "choices": list(COUNTS)},
    "needle_color": {
        "kind": "long",
        "question": "A colored shape appeared briefly in the video. What color was it?",
        "choices": list(COLORS),
    },
    "needle_time": {
        "kind": "long",
        "question": "When did the colored shape appear: beginning, middle, or end?",
        "choices": list(THIRDS),
    },
    "image_color": {"kind": "image", "question": "What color is the shape?", "choices": list(COLORS)},
    "image_shape": {"kind": "image", "question": "What shape is shown?", "choices": list(SHAPES)},
}
SHORT_TASKS = ("color", "shape", "motion", "count")
LONG_TASKS = ("needle_color", "needle_time")
IMAGE_TASKS = ("image_color", "image_shape")


def shown_tasks(kind: str, task: str) -> list[str]:
    """The tasks a record's media answers: every short clip shows a colour and a shape, a ``motion``
    clip also a direction and a ``count`` clip a number of flashes (the drift of the others is no
    direction, their steady shape no count); a long video its needle's colour and time; an image its
    colour and shape."""
    if kind == "short":
        return ["color", "shape", *([task] if task in ("motion", "count") else [])]
    return list(LONG_TASKS if kind == "long" else IMAGE_TASKS)


def prompt_for(task: str) -> str:
    """The question text of a task, with its answer choices."""
    t = TASKS[task]
    return f"{t['question']} Answer with one word: {', '.join(t['choices'])}."


@dataclass
class SynthConfig:
    """Corpus options (see ``--help``)."""

    num_train: int = 256
    num_heldout: int = 64
    long_fraction: float = 0.125
    images: int = 0
    seed: int = 0
    width: int = 64
    height: int = 64
    short_fps: float = 8.0
    short_seconds: int = 4
    long_fps: float = 2.0
    long_duration: tuple[float, float] = (60.0, 120.0)
    needle_seconds: float = 4.0
    crf: int = 20
    # "all": a training record asks, after its own question, every other fact its video shows, turn
    # by turn in a seeded order (a short clip's colour and shape, and its motion or count when it
    # moves or flashes; a long video's needle colour and time), as instruction data asks several
    # questions per video; "one": its own question only. Held-out records always ask one.
    train_questions: str = "one"
    # the half-size of a clip's or image's shape (and of a needle), a fraction of min(width, height),
    # drawn uniformly from [lo, hi] per video (from its own seed, so [x, x] keeps every other draw)
    shape_scale: tuple[float, float] = (0.17, 0.17)
    splits: dict = field(default_factory=dict)  # filled in: split -> counts


# --------------------------------------------------------------------------------------------------
# drawing


def _grid(h: int, w: int):
    ys, xs = np.mgrid[0:h, 0:w]
    return ys.astype(np.float32), xs.astype(np.float32)


def shape_mask(shape: str, cy: float, cx: float, r: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Boolean mask of a filled shape of half-size ``r`` centred at ``(cy, cx)``."""
    if shape == "square":
        return (np.abs(ys - cy) <= r * 0.85) & (np.abs(xs - cx) <= r * 0.85)
    if shape == "circle":
        return (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
    if shape == "triangle":  # apex up
        top, bottom = cy - r, cy + r
        return (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= (ys - top) * 0.6)
    raise ValueError(f"unknown shape {shape!r}")


def shape_radius(spec: dict, cfg: SynthConfig) -> float:
    """The shape's half-size in pixels for this video: ``cfg.shape_scale`` drawn from a generator of
    its own (the video's seed and 11), so a fixed scale leaves every other draw as it was."""
    lo, hi = (float(x) for x in cfg.shape_scale)
    frac = lo if lo == hi else float(np.random.default_rng([*spec["seed"], 11]).uniform(lo, hi))
    return frac * min(cfg.height, cfg.width)


def _canvas(n: int, h: int, w: int) -> np.ndarray:
    out = np.empty((n, h, w, 3), np.uint8)
    out[:] = BACKGROUND
    return out


def render_short(spec: dict, cfg: SynthConfig) -> tuple[np.ndarray, dict]:
    """Frames ``[T, H, W, 3]`` of a short clip and the facts it shows."""
    rng = np.random.default_rng(spec["seed"])
    h, w = cfg.height, cfg.width
    n = int(round(cfg.short_seconds * cfg.short_fps))
    ys, xs = _grid(h, w)
    r = shape_radius(spec, cfg)
    color = list(COLORS)[rng.integers(len(COLORS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
    count = int(rng.integers(1, len(COUNTS) + 1))
    task = spec["task"]
    frames = _canvas(n, h, w)
    lo, hi = 0.3, 0.7
    cy0, cx0 = rng.uniform(lo, hi) * h, rng.uniform(lo, hi) * w
    visible = np.ones(n, bool)
    path = np.tile([[cy0, cx0]], (n, 1))
    if task == "motion":
        t = np.linspace(0.0, 1.0, n)
        a, b = 0.22, 0.78
        if direction in ("left", "right"):
            xs_path = (a + (b - a) * t) * w if direction == "right" else (b - (b - a) * t) * w
            path = np.stack([np.full(n, cy0), xs_path], 1)
        else:
            ys_path = (a + (b - a) * t) * h if direction == "down" else (b - (b - a) * t) * h
            path = np.stack([ys_path, np.full(n, cx0)], 1)
    elif task == "count":
        slots = int(cfg.short_seconds)
        chosen = sorted(rng.choice(slots, size=count, replace=False).tolist())
        visible[:] = False
        per_slot = cfg.short_fps
        half = max(1, int(round(per_slot / 2)))
        for s in chosen:
            f0 = int(round(s * per_slot))
            visible[f0 : f0 + half] = True
    else:  # color / shape: a slow drift in a random direction
        v = rng.uniform(-0.08, 0.08, size=2) * np.array([h, w])
        t = np.linspace(-0.5, 0.5, n)[:, None]
        path = np.array([[cy0, cx0]]) + t * v
    rgb = np.array(COLORS[color], np.uint8)
    for i in range(n):
        if visible[i]:
            frames[i][shape_mask(shape, path[i, 0], path[i, 1], r, ys, xs)] = rgb
    facts = {"color": color, "shape": shape, "motion": direction, "count": COUNTS[count - 1]}
    return frames, facts


def render_long(spec: dict, cfg: SynthConfig, needle: bool = True) -> tuple[np.ndarray, dict]:
    """Frames of a long video with one needle, and the facts (needle colour, time, third);
    ``needle=False``: the same video without its needle (a haystack for ``data_tools.make_niah``)."""
    rng = np.random.default_rng(spec["seed"])
    h, w = cfg.height, cfg.width
    duration = float(rng.uniform(*cfg.long_duration))
    fps = cfg.long_fps
    n = max(1, int(round(duration * fps)))
    duration = n / fps
    ys, xs = _grid(h, w)
    r = shape_radius(spec, cfg)
    color = list(COLORS)[rng.integers(len(COLORS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    third = int(rng.integers(3))
    margin = 0.05 * duration
    lo = third * duration / 3 + margin
    hi = (third + 1) * duration / 3 - margin - cfg.needle_seconds
    if hi < lo:
        raise ValueError(
            f"needle of {cfg.needle_seconds}s does not fit in a third of a {duration:.1f}s video; "
            "use longer videos or a shorter needle"
        )
    t0 = float(rng.uniform(lo, hi))
    t1 = t0 + cfg.needle_seconds
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    # distractor: a grey square bouncing around
    pos = np.array([rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w])
    vel = rng.uniform(-1, 1, size=2)
    vel = vel / (np.linalg.norm(vel) + 1e-6) * 0.04 * min(h, w) * (2.0 / fps)
    dr = 0.09 * min(h, w)
    frames = _canvas(n, h, w)
    grey = np.array(DISTRACTOR, np.uint8)
    rgb = np.array(COLORS[color], np.uint8)
    for i in range(n):
        pos = pos + vel
        for k, size in ((0, h), (1, w)):
            if pos[k] < dr or pos[k] > size - dr:
                vel[k] = -vel[k]
                pos[k] = min(max(pos[k], dr), size - dr)
        frames[i][(np.abs(ys - pos[0]) <= dr) & (np.abs(xs - pos[1]) <= dr)] = grey
        t = i / fps
        if needle and t0 <= t < t1:
            frames[i][shape_mask(shape, cy, cx, r, ys, xs)] = rgb
    facts = {
        "needle_color": color,
        "needle_time": THIRDS[third],
        "needle_shape": shape,
        "needle_start": round(t0, 3),
        "needle_end": round(t1, 3),
        "duration": duration,
    }
    return frames, facts


def render_image(spec: dict, cfg: SynthConfig) -> tuple[np.ndarray, dict]:
    """A still image (one short-clip frame, static shape)."""
    rng = np.random.default_rng(spec["seed"])
    h, w = cfg.height, cfg.width
    ys, xs = _grid(h, w)
    color = list(COLORS)[rng.integers(len(COLORS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    img = _canvas(1, h, w)[0]
    img[shape_mask(shape, rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, shape_radius(spec, cfg), ys, xs)] = (
        COLORS[color]
    )
    return img, {"image_color": color, "image_shape": shape}


# --------------------------------------------------------------------------------------------------
# the corpus


def _specs(cfg: SynthConfig) -> list[dict]:
    """Every item to make, in output order; per-item seeds derive from (seed, split, kind, index)."""
    specs = []
    for split_id, (split, total) in enumerate((("train", cfg.num_train), ("heldout", cfg.num_heldout))):
        n_long = int(round(total * cfg.long_fraction))
        n_short = total - n_long
        n_img = cfg.images if total else 0
        for kind, count, tasks, kind_id in (
            ("short", n_short, SHORT_TASKS, 0),
            ("long", n_long, LONG_TASKS, 1),
            ("image", n_img, IMAGE_TASKS, 2),
        ):
            for i in range(count):
                seed = [cfg.seed, split_id, kind_id, i]
                task = tasks[i % len(tasks)]  # balanced tasks; the answers are drawn from the seed
                ext = "png" if kind == "image" else "mp4"
                folder = "images" if kind == "image" else "videos"
                specs.append(
                    {
                        "split": split,
                        "kind": kind,
                        "index": i,
                        "task": task,
                        "seed": seed,
                        "id": f"{split}_{kind}_{i:06d}",
                        "path": f"{folder}/{split}/{kind}_{i:06d}.{ext}",
                    }
                )
    return specs


def _make(args) -> dict:
    """Render and write one item; returns its annotation record."""
    spec, cfg, out_dir = args
    path = os.path.join(out_dir, spec["path"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    task = spec["task"]
    rec = {"id": spec["id"]}
    if spec["kind"] == "image":
        from PIL import Image

        img, facts = render_image(spec, cfg)
        tmp = f"{path}.tmp{os.getpid()}"
        Image.fromarray(img).save(tmp, format="PNG")
        os.replace(tmp, path)
        rec["image"] = spec["path"]
    else:
        if spec["kind"] == "short":
            frames, facts = render_short(spec, cfg)
            fps = cfg.short_fps
            facts["duration"] = len(frames) / fps
        else:
            frames, facts = render_long(spec, cfg)
            fps = cfg.long_fps
        write_mp4(path, frames, fps, crf=cfg.crf)
        rec["video"] = spec["path"]
    answer = facts[task]
    rec["conversations"] = [
        {"from": "human", "value": "<image>\n" + prompt_for(task)},
        {"from": "gpt", "value": answer},
    ]
    if cfg.train_questions == "all" and spec["split"] == "train":
        others = [t for t in shown_tasks(spec["kind"], task) if t != task]
        order = np.random.default_rng([*spec["seed"], 7]).permutation(len(others))
        for k in order:
            rec["conversations"] += [{"from": "human", "value": prompt_for(others[k])},
                                     {"from": "gpt", "value": facts[others[k]]}]
    rec.update(task=task, answer=answer, choices=list(TASKS[task]["choices"]), split=spec["split"])
    if spec["kind"] != "image":
        rec["duration"] = round(float(facts["duration"]), 6)
        rec["fps"] = fps
    for k in ("needle_start", "needle_end", "needle_shape"):
        if k in facts:
            rec[k] = facts[k]
    return rec


def generate_corpus(out_dir: str, cfg: SynthConfig | None = None, workers: int | None = None, progress: bool = True):
    """Write the corpus under ``out_dir``; returns the ``meta.json`` content.

    ``workers``: processes rendering and encoding in parallel (default: up to 4; 1 = in this process).
    The output does not depend on it.
    """
    cfg = cfg or SynthConfig()
    if not 0.0 <= cfg.long_fraction <= 1.0:
        raise ValueError(f"long_fraction must be in [0, 1], got {cfg.long_fraction}")
    lo, hi = (float(x) for x in cfg.shape_scale)
    if not 0 < lo <= hi <= 0.25:
        raise ValueError(f"shape_scale must be 0 < lo <= hi <= 0.25 (of the frame's shorter side), got {cfg.shape_scale}")
    if cfg.train_questions not in ("one", "all"):
        raise ValueError(f"train_questions must be 'one' or 'all', got {cfg.train_questions!r}")
    if cfg.short_seconds < len(COUNTS):
        raise ValueError(f"short clips need at least {len(COUNTS)} one-second slots for the count task")
    os.makedirs(out_dir, exist_ok=True)
    specs = _specs(cfg)
    workers = min(4, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    jobs = [(s, cfg, out_dir) for s in specs]
    bar = tqdm(total=len(jobs), desc="synth videos", unit="file", disable=not progress)
    records = []
    if workers == 1 or len(jobs) < 8:
        for job in jobs:
            records.append(_make(job))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for rec in pool.map(_make, jobs, chunksize=4):
                records.append(rec)
                bar.update()
    bar.close()
    counts = {}
    for split in ("train", "heldout"):
        rows = [r for r in records if r["split"] == split]
        tmp = os.path.join(out_dir, f"{split}.jsonl.tmp")
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")
        os.replace(tmp, os.path.join(out_dir, f"{split}.jsonl"))
        counts[split] = {t: sum(1 for r in rows if r["task"] == t) for t in TASKS if any(r["task"] == t for r in rows)}
    meta = {
        "version": VERSION,
        "config": {k: v for k, v in asdict(cfg).items() if k != "splits"},
        "counts": counts,
        "tasks": {
            name: {**t, "chance": 1.0 / len(t["choices"]), "prompt": prompt_for(name)} for name, t in TASKS.items()
        },
    }
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(_readme(meta))
    return meta


def _readme(meta: dict) -> str:
    lines = [
        "# Synthetic video corpus (data_tools.synth_videos)",
        "",
        "LLaVA annotations: `train.jsonl`, `heldout.jsonl` (media paths relative to this folder).",
        "Every record has `task`, `answer` and `choices`; `meta.json` lists the tasks and chance levels.",
        "",
        "| task | kind | choices | chance | train | heldout |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in meta["tasks"].items():
        tr = meta["counts"].get("train", {}).get(name, 0)
        ho = meta["counts"].get("heldout", {}).get(name, 0)
        if tr or ho:
            lines.append(
                f"| {name} | {t['kind']} | {', '.join(t['choices'])} | {t['chance']:.3f} | {tr} | {ho} |"
            )
    lines += ["", "Regenerate with the options in `meta.json` (`config`); the output is deterministic.", ""]
    return "\n".join(lines)


def _size(text: str) -> tuple[int, int]:
    if "x" in text:
        w, h = text.lower().split("x")
        return int(w), int(h)
    return int(text), int(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.synth_videos", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-train", type=int, default=256, help="train records (videos)")
    p.add_argument("--num-heldout", type=int, default=64, help="held-out records (videos)")
    p.add_argument("--long-fraction", type=float, default=0.125, help="fraction of long needle videos")
    p.add_argument("--images", type=int, default=0, help="still-image records per split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", default="64", help="WxH or one number for a square (default 64)")
    p.add_argument("--short-fps", type=float, default=8.0)
    p.add_argument("--short-seconds", type=int, default=4)
    p.add_argument("--long-fps", type=float, default=2.0)
    p.add_argument("--long-duration", type=float, nargs=2, default=(60.0, 120.0), metavar=("MIN", "MAX"))
    p.add_argument("--needle-seconds", type=float, default=4.0)
    p.add_argument("--crf", type=int, default=20, help="x264 quality (lower: larger files)")
    p.add_argument("--train-questions", choices=("one", "all"), default="one",
                   help="all: training records also ask every other fact their video shows (multi-turn)")
    p.add_argument("--shape-scale", type=float, nargs=2, default=(0.17, 0.17), metavar=("LO", "HI"),
                   help="the shapes' half-size, a fraction of the shorter side, drawn in [LO, HI] per video")
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: up to 4)")
    a = p.parse_args(argv)
    w, h = _size(a.resolution)
    cfg = SynthConfig(
        num_train=a.num_train,
        num_heldout=a.num_heldout,
        long_fraction=a.long_fraction,
        images=a.images,
        seed=a.seed,
        width=w,
        height=h,
        short_fps=a.short_fps,
        short_seconds=a.short_seconds,
        long_fps=a.long_fps,
        long_duration=tuple(a.long_duration),
        needle_seconds=a.needle_seconds,
        crf=a.crf,
        train_questions=a.train_questions,
        shape_scale=tuple(a.shape_scale),
    )
    meta = generate_corpus(a.out, cfg, workers=a.workers)
    total = sum(sum(c.values()) for c in meta["counts"].values())
    print(f"wrote {total} records to {a.out} ({json.dumps(meta['counts'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
