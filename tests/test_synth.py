"""The synthetic corpus: deterministic, real H.264, and every answer readable back from the pixels."""

import hashlib
import json
import os

import numpy as np
import pytest

from data_tools.synth_videos import TASKS, SynthConfig, generate_corpus, main, prompt_for
from videoflash.data.sampling import frame_indices

CFG = SynthConfig(
    num_train=16,
    num_heldout=8,
    long_fraction=0.25,
    images=2,
    seed=3,
    width=64,
    height=64,
    long_duration=(12.0, 18.0),
    needle_seconds=1.5,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    meta = generate_corpus(str(out), CFG, workers=1, progress=False)
    return out, meta


def _tree(root):
    """Every file's digest; for videos, the digest of the decoded frames: libx264 occasionally writes
    different bytes for the same frames (seen about once in 30 files), so the corpus is deterministic
    in what a model sees, not in the encoder's byte stream."""
    import decord

    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            if p.endswith(".mp4"):
                vr = decord.VideoReader(p)
                data = vr.get_batch(list(range(len(vr)))).asnumpy().tobytes()
            else:
                with open(p, "rb") as fh:
                    data = fh.read()
            out[os.path.relpath(p, root)] = hashlib.sha1(data).hexdigest()
    return out


def _records(root, split):
    with open(os.path.join(root, f"{split}.jsonl")) as f:
        return [json.loads(line) for line in f]


def _frames(root, rec, indices=None):
    import decord

    vr = decord.VideoReader(os.path.join(root, rec["video"]), num_threads=1)
    idx = list(range(len(vr))) if indices is None else indices
    return vr.get_batch(idx).asnumpy().astype(np.int32), vr


def _colored(frame):
    """Mask of saturated pixels (the shapes; the background and the grey distractor are unsaturated)."""
    return (frame.max(axis=-1) - frame.min(axis=-1)) > 80


def _color_name(frame):
    m = _colored(frame)
    r, g, b = (frame[m].mean(axis=0) if m.any() else np.zeros(3)).tolist()
    if r > 150 and g > 150 and b < 110:
        return "yellow"
    if r > 150 and g < 110 and b < 110:
        return "red"
    if g > 140 and r < 110 and b < 130:
        return "green"
    if b > 150 and r < 110:
        return "blue"
    return None


def _shape_name(frame):
    m = _colored(frame)
    ys, xs = np.nonzero(m)
    fill = m.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    # filled square ~1.0, disc ~0.79, triangle ~0.5
    return "square" if fill > 0.9 else "circle" if fill > 0.68 else "triangle"


def _centroid(frame):
    ys, xs = np.nonzero(_colored(frame))
    return ys.mean(), xs.mean()


def test_deterministic_whatever_the_worker_count(corpus, tmp_path):
    root, _ = corpus
    again = tmp_path / "again"
    generate_corpus(str(again), CFG, workers=2, progress=False)
    assert _tree(root) == _tree(again)


def test_layout_meta_and_splits(corpus):
    root, meta = corpus
    train, held = _records(root, "train"), _records(root, "heldout")
    assert len(train) == 16 + 2 and len(held) == 8 + 2
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    assert not {r.get("video") or r.get("image") for r in train} & {r.get("video") or r.get("image") for r in held}
    for name, t in meta["tasks"].items():
        assert t["chance"] == pytest.approx(1.0 / len(t["choices"]))
    with open(os.path.join(root, "meta.json")) as f:
        assert json.load(f) == json.loads(json.dumps(meta))
    assert os.path.exists(os.path.join(root, "README.md"))
    for r in train + held:
        assert r["answer"] in r["choices"] and r["conversations"][1]["value"] == r["answer"]
        assert r["conversations"][0]["value"].startswith("<image>\n")
        media = os.path.join(root, r.get("video") or r.get("image"))
        with open(media, "rb") as f:
            head = f.read(12)
        assert (head[4:8] == b"ftyp") if "video" in r else head.startswith(b"\x89PNG")
    # four short tasks, two long ones, balanced
    tasks = [r["task"] for r in train]
    assert tasks.count("color") == tasks.count("shape") == tasks.count("motion") == tasks.count("count") == 3
    assert tasks.count("needle_color") == tasks.count("needle_time") == 2


def _short_answer(task, frames):
    """What a short clip's pixels say for ``task`` (None: they do not say it)."""
    shown = max(range(len(frames)), key=lambda i: (_colored(frames[i]).sum(), i == len(frames) // 2))
    if task == "color":  # on the frame that shows most of the shape (a count clip's flashes come and go)
        return _color_name(frames[shown])
    if task == "shape":
        return _shape_name(frames[shown])
    if task == "motion":
        (y0, x0), (y1, x1) = _centroid(frames[0]), _centroid(frames[-1])
        dy, dx = y1 - y0, x1 - x0
        if max(abs(dx), abs(dy)) <= 20:
            return None
        return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
    if task == "count":
        counts = set()
        for n in (4, 8, 16):  # stage-1 (4 frames) and stage-2 style sampling both see each flash once
            idx = frame_indices(32, 8.0, "middle", 0, n)
            seen = [bool(_colored(frames[i]).any()) for i in idx]
            if n == 4:  # one frame per one-second slot: flashes in adjacent slots touch, count frames
                counts.add(sum(seen))
            else:  # two or more frames per slot: each flash is a run of frames with a gap after it
                counts.add(sum(1 for k, v in enumerate(seen) if v and (k == 0 or not seen[k - 1])))
        return {1: "one", 2: "two", 3: "three"}.get(counts.pop()) if len(counts) == 1 else None
    raise AssertionError(task)


def test_short_clip_answers_are_in_the_pixels(corpus):
    root, _ = corpus
    checked = 0
    for r in _records(root, "train") + _records(root, "heldout"):
        if not r["id"].split("_")[1] == "short":
            continue
        frames, vr = _frames(root, r)
        assert len(vr) == 32 and vr.get_avg_fps() == pytest.approx(8.0)
        assert _short_answer(r["task"], frames) == r["answer"], r["id"]
        checked += 1
    assert checked == 12 + 6


def _needle_answers(frames, fps):
    on = [i for i, f in enumerate(frames) if _colored(f).sum() > 20]
    t0, t1 = on[0] / fps, (on[-1] + 1) / fps
    duration = len(frames) / fps
    third = ["beginning", "middle", "end"][int(((t0 + t1) / 2) // (duration / 3))]
    return {"needle_color": _color_name(frames[on[len(on) // 2]]), "needle_time": third}


def test_all_questions_per_training_video_are_answered_by_its_pixels(corpus, tmp_path):
    # train_questions="all": each training record keeps its own first turn, then asks every other fact
    # its video shows; each answer is read back from the pixels; the held-out split is unchanged
    import dataclasses

    root, _ = corpus
    out = tmp_path / "all"
    generate_corpus(str(out), dataclasses.replace(CFG, train_questions="all"), workers=1, progress=False)
    one = {r["id"]: r for r in _records(root, "train")}
    assert _records(out, "heldout") == _records(root, "heldout")
    turns_by_kind = {"short": set(), "long": set()}
    for r in _records(out, "train"):
        conv = r["conversations"]
        assert conv[:2] == one[r["id"]]["conversations"] and r["answer"] == one[r["id"]]["answer"]
        kind = r["id"].split("_")[1]
        pairs = [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv), 2)]
        assert all(c["from"] == ("human" if i % 2 == 0 else "gpt") for i, c in enumerate(conv))
        tasks = [next(t for t in TASKS if TASKS[t]["kind"] == kind and prompt_for(t) in q) for q, _ in pairs]
        assert len(set(tasks)) == len(tasks) and tasks[0] == r["task"]
        if kind == "image":
            assert sorted(tasks) == ["image_color", "image_shape"]
            continue
        frames, vr = _frames(out, r)
        for task, (_, answer) in zip(tasks, pairs):
            want = _short_answer(task, frames) if kind == "short" else _needle_answers(frames, vr.get_avg_fps())[task]
            assert want == answer, (r["id"], task)
        expect = {"color", "shape", *({r["task"]} & {"motion", "count"})} if kind == "short" else {"needle_color", "needle_time"}
        assert set(tasks) == expect, r["id"]
        turns_by_kind[kind].add(len(tasks))
    assert turns_by_kind == {"short": {2, 3}, "long": {2}}


def test_needles_are_where_the_answer_says(corpus):
    root, _ = corpus
    checked = 0
    for r in _records(root, "train") + _records(root, "heldout"):
        if r["id"].split("_")[1] != "long":
            continue
        frames, vr = _frames(root, r)
        fps = vr.get_avg_fps()
        assert fps == pytest.approx(2.0) and 12.0 <= len(vr) / fps <= 18.0
        on = [i for i, f in enumerate(frames) if _colored(f).sum() > 20]
        assert on, r["id"]
        t0, t1 = on[0] / fps, (on[-1] + 1) / fps
        assert t0 == pytest.approx(r["needle_start"], abs=0.5) and t1 == pytest.approx(r["needle_end"], abs=0.5)
        assert on == list(range(on[0], on[-1] + 1))  # one event
        duration = len(vr) / fps
        third = ["beginning", "middle", "end"][int(((t0 + t1) / 2) // (duration / 3))]
        color = _color_name(frames[on[len(on) // 2]])
        assert (third if r["task"] == "needle_time" else color) == r["answer"]
        # at about 1 fps (dynamic_fps1) the needle is seen in at least one sampled frame
        idx = frame_indices(len(vr), fps, "dynamic_fps1", 4, 512)
        assert any(i in on for i in idx)
        checked += 1
    assert checked == 4 + 2


def test_image_records(corpus):
    from PIL import Image

    root, _ = corpus
    imgs = [r for r in _records(root, "train") if "image" in r]
    assert [r["task"] for r in imgs] == ["image_color", "image_shape"]
    for r in imgs:
        arr = np.asarray(Image.open(os.path.join(root, r["image"])).convert("RGB")).astype(np.int32)
        got = _color_name(arr) if r["task"] == "image_color" else _shape_name(arr)
        assert got == r["answer"]


def test_cli(tmp_path):
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--num-train", "4", "--num-heldout", "0", "--long-fraction", "0",
                 "--resolution", "48x32", "--workers", "1"]) == 0  # fmt: skip
    recs = _records(out, "train")
    assert len(recs) == 4 and _records(out, "heldout") == []
    from videoflash.data.decode import VideoDecoder

    frames = VideoDecoder(open(os.path.join(out, recs[0]["video"]), "rb").read()).frames([0])
    assert frames.shape == (1, 32, 48, 3)


def test_shape_scale_draws_each_videos_size_and_keeps_the_answers(tmp_path):
    # shapes of half-size 0.10..0.24 of the 64-px side: a circle of half-size r covers about pi r^2
    # pixels, a square (sides 1.7 r) 2.89 r^2, a triangle (height 2r, base 2.4r) 2.4 r^2; the drawn
    # sizes spread over the range, and the answers still read back from the pixels
    cfg = SynthConfig(num_train=24, num_heldout=0, long_fraction=0.0, seed=5, shape_scale=(0.10, 0.24))
    generate_corpus(str(tmp_path), cfg, workers=1, progress=False)
    area = {"circle": np.pi, "square": 1.7**2, "triangle": 2.4}
    halves = []
    for r in _records(tmp_path, "train"):
        frames, _ = _frames(tmp_path, r)
        shown = next(f for f in frames if _colored(f).sum())
        if r["task"] in ("color", "shape", "motion", "count"):
            assert _short_answer(r["task"], frames) == r["answer"], r["id"]
        shape = _shape_name(shown)
        halves.append(np.sqrt(_colored(shown).sum() / area[shape]) / 64)
    assert 0.09 < min(halves) < 0.14 and 0.20 < max(halves) < 0.25, halves
    with pytest.raises(ValueError, match="shape_scale"):
        generate_corpus(str(tmp_path / "bad"), SynthConfig(num_train=2, num_heldout=0, shape_scale=(0.2, 0.1)))
