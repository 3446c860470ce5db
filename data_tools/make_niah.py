"""Needle-in-a-haystack videos over any haystack video(s), single-hop and multi-hop (videochat_flash §5.4).

``python -m data_tools.make_niah --haystack hay.mp4 [more.mp4 ...] --out data/niah --lengths 64,256
--depths 0,0.25,0.5,0.75,1 [--hops 3]``

The haystack videos are read at 1 frame per second one after the other (looping when they are too
short), so frame ``i`` of every output video is second ``i``, and ``length`` frames make a video of
``length`` seconds at 1 fps. A needle is a frame showing one coloured shape (the colour is the
answer: "What color is the shape in the needle frame?", four lettered options); it replaces
``--needle-frames`` haystack frames starting at ``int(depth * (length - needle_frames))``.

Multi-hop (``--hops K``, K >= 2): K - 1 clue frames form a chain that leads to the needle, as in the
published multi-hop set: clue 1 sits at the very start and says ``START`` with the shape of the next
hop; clue k shows its own hop number and the next hop's marker; the clues are spread evenly over
the haystack (clue k after segment ``[(k-1)·I, k·I)`` with ``I = length / (K - 1)``), the needle at
its depth, and the question asks to follow the chain from the START frame.

``--answer word`` asks for the colour itself (no options, no post-prompt; the reply counts when it
is the colour's name, the synthetic corpus's exact-match rule) for models trained to answer in words,
as the quickstart model is; ``--question`` replaces the question text (e.g. the corpus's own
needle question).

Writes ``<out>/videos/<id>.mp4`` and ``<out>/niah.json``: one record per (length, depth) with the
question, options, answer (the letter, or with ``--answer word`` the colour), the needle's and the
clues' frame indices. Same seed, same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from data_tools.media import write_mp4
from data_tools.synth_videos import COLORS, SHAPES, _grid, shape_mask

LETTERS = "ABCD"
QUESTION_SINGLE = "A frame in the video shows one colored shape. What color is that shape?"
QUESTION_MULTI = ("Find the frame that says START. Follow the clues frame by frame to the final frame. "
                  "What color is the shape in the final frame?")
POST_PROMPT = "Answer with the option's letter from the given choices directly."
ANSWER_STYLES = ("letter", "word")


def haystack_frames(paths: list[str], length: int) -> np.ndarray:
    """``length`` frames at 1 fps from ``paths`` in order, looping; ``[length, H, W, 3]`` uint8 at
    the first video's size."""
    import decord

    frames: list[np.ndarray] = []
    size = None
    while len(frames) < length:
        before = len(frames)
        for p in paths:
            vr = decord.VideoReader(str(p)) if size is None else decord.VideoReader(str(p), width=size[1], height=size[0])
            fps = vr.get_avg_fps() or 1.0
            idx = np.arange(0, len(vr), max(fps, 1e-6)).astype(int)
            idx = idx[idx < len(vr)][: length - len(frames)]
            if len(idx):
                batch = vr.get_batch(idx.tolist()).asnumpy()
                size = size or batch.shape[1:3]
                frames.extend(batch)
            if len(frames) >= length:
                break
        if len(frames) == before:
            raise ValueError(f"no frames could be read from the haystack {paths}")
    return np.stack(frames[:length])


def needle_frame(h: int, w: int, color: str, shape: str) -> np.ndarray:
    ys, xs = _grid(h, w)
    out = np.full((h, w, 3), 30, np.uint8)
    out[shape_mask(shape, h / 2, w / 2, min(h, w) * 0.35, ys, xs)] = COLORS[color]
    return out


def clue_frame(h: int, w: int, hop: int, next_shape: str) -> np.ndarray:
    """A white frame with black text: the hop (``START`` for the first) and the next hop's shape,
    drawn in grey below the text."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((2, 2), "START" if hop == 1 else f"CLUE {hop}", fill=(0, 0, 0))
    d.text((2, 14), f"next: {next_shape}", fill=(0, 0, 0))
    arr = np.asarray(img).copy()
    ys, xs = _grid(h, w)
    arr[shape_mask(next_shape, h * 0.72, w / 2, min(h, w) * 0.15, ys, xs)] = (120, 120, 120)
    return arr


def needle_start(length: int, depth: float, needle_frames: int) -> int:
    return int(depth * (length - needle_frames))


def build(haystack: list[str], out: str, lengths: list[int], depths: list[float], hops: int = 1,
          needle_frames: int = 1, seed: int = 0, question: str | None = None,
          answer: str = "letter") -> list[dict]:
    if answer not in ANSWER_STYLES:
        raise ValueError(f"answer style {answer!r} is not one of {ANSWER_STYLES}")
    if hops < 1:
        raise ValueError("--hops must be >= 1")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"depth {d} is outside [0, 1]")
    out_dir = Path(out)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    hay_all = haystack_frames(haystack, max(lengths))
    h, w = hay_all.shape[1:3]
    records = []
    for length in lengths:
        if length < needle_frames + hops:
            raise ValueError(f"length {length} is too short for {needle_frames} needle frames and {hops - 1} clues")
        for depth in depths:
            frames = hay_all[:length].copy()
            color = rng.choice(list(COLORS))
            shape = rng.choice(SHAPES)
            options = rng.sample([c for c in COLORS if c != color], 3) + [color]
            rng.shuffle(options)
            start = needle_start(length, depth, needle_frames)
            needle_idx = list(range(start, start + needle_frames))
            clue_idx: list[int] = []
            if hops > 1:
                step = length / (hops - 1)
                clue_idx = [0] + [min(length - 1, int(k * step)) for k in range(1, hops - 1)]
                # a clue never covers the needle: move it to the nearest free frame
                taken = set(needle_idx)
                for i, c in enumerate(clue_idx):
                    while c in taken:
                        c = c + 1 if c + 1 < length else c - needle_frames - 1
                    clue_idx[i] = c
                    taken.add(c)
                shapes = [rng.choice(SHAPES) for _ in clue_idx[1:]] + [shape]
                for k, (c, nxt) in enumerate(zip(clue_idx, shapes), start=1):
                    frames[c] = clue_frame(h, w, k, nxt)
            for i in needle_idx:
                frames[i] = needle_frame(h, w, color, shape)
            rid = f"L{length}_D{depth:g}_H{hops}"
            write_mp4(str(out_dir / "videos" / f"{rid}.mp4"), frames, 1.0)
            text = question or (QUESTION_MULTI if hops > 1 else QUESTION_SINGLE)
            if answer == "word":
                prompt, expected = text, color
            else:
                prompt = text + "\n" + "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options)) + "\n" + POST_PROMPT
                expected = LETTERS[options.index(color)]
            records.append({"id": rid, "video": f"videos/{rid}.mp4", "length": length, "depth": depth, "hops": hops,
                            "needle_frames": needle_idx, "clue_frames": clue_idx, "needle_color": color,
                            "needle_shape": shape, "options": options, "answer": expected,
                            "answer_style": answer, "prompt": prompt})
    with open(out_dir / "niah.json", "w") as f:
        json.dump({"haystack": [str(p) for p in haystack], "hops": hops, "seed": seed, "records": records}, f, indent=1)
    return records


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.make_niah", description=__doc__.split("\n\n")[0])
    p.add_argument("--haystack", nargs="+", required=True, help="haystack video file(s), read at 1 fps in order")
    p.add_argument("--out", required=True)
    p.add_argument("--lengths", default="64,128,256", help="video lengths in frames (= seconds at 1 fps)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    p.add_argument("--hops", type=int, default=1, help="1: single needle; K >= 2: K-1 clue frames then the needle")
    p.add_argument("--needle-frames", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--question", default=None, help="the question text (default: the published-style one)")
    p.add_argument("--answer", choices=ANSWER_STYLES, default="letter",
                   help="letter: four lettered options (default); word: the colour's name, no options")
    a = p.parse_args(argv)
    for hs in a.haystack:
        if not Path(hs).is_file():
            p.error(f"haystack video not found: {hs}")
    recs = build(a.haystack, a.out, [int(x) for x in _floats(a.lengths)], _floats(a.depths), a.hops,
                 a.needle_frames, a.seed, question=a.question, answer=a.answer)
    print(f"wrote {len(recs)} videos and {Path(a.out) / 'niah.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
