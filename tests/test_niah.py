"""NIAH: the builder puts the needle (and the multi-hop clue chain) at the requested frames of a real
mp4, the scorer covers the grid, and the heatmap is a real, non-blank PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_tools.make_niah import main as make_niah
from data_tools.synth_videos import COLORS
from tests.bench_fixtures import write_export
from tests.inference_helpers import write_mp4


@pytest.fixture(scope="module")
def haystack(tmp_path_factory):
    # 6 s at 4 fps, read at 1 fps: 6 haystack frames, looped for longer videos
    return write_mp4(tmp_path_factory.mktemp("hay") / "hay.mp4", 24, fps=4, width=64, height=64)


def _decode(path):
    import decord

    return decord.VideoReader(str(path)).get_batch(list(range(len(decord.VideoReader(str(path)))))).asnumpy()


def test_single_hop_needle_at_the_requested_depth(tmp_path, haystack):
    assert make_niah(["--haystack", str(haystack), "--out", str(tmp_path), "--lengths", "8,16",
                      "--depths", "0,0.5,1", "--needle-frames", "2"]) == 0
    meta = json.loads((tmp_path / "niah.json").read_text())
    assert len(meta["records"]) == 6
    for rec in meta["records"]:
        frames = _decode(tmp_path / rec["video"])
        assert len(frames) == rec["length"]
        start = int(rec["depth"] * (rec["length"] - 2))  # the documented placement
        assert rec["needle_frames"] == [start, start + 1]
        want = np.array(COLORS[rec["needle_color"]], float)
        centre = frames[:, 28:36, 28:36].reshape(len(frames), -1, 3).mean(1)
        near = np.abs(centre - want).max(1) < 30
        assert sorted(np.nonzero(near)[0].tolist()) == [start, start + 1], rec["id"]
        assert rec["options"][ "ABCD".index(rec["answer"])] == rec["needle_color"]


def test_multi_hop_chain_is_present(tmp_path, haystack):
    assert make_niah(["--haystack", str(haystack), "--out", str(tmp_path), "--lengths", "12",
                      "--depths", "0.75", "--hops", "4"]) == 0
    rec = json.loads((tmp_path / "niah.json").read_text())["records"][0]
    assert len(rec["clue_frames"]) == 3 and rec["clue_frames"][0] == 0
    assert rec["clue_frames"] == sorted(rec["clue_frames"]) and rec["needle_frames"] == [int(0.75 * 11)]
    frames = _decode(tmp_path / rec["video"])
    bright = frames.reshape(len(frames), -1, 3).mean((1, 2)) > 200  # clue frames are white with text
    assert np.nonzero(bright)[0].tolist() == rec["clue_frames"]
    assert "START" in rec["prompt"]


def test_score_grid_and_heatmap_png(tmp_path, haystack):
    from PIL import Image

    from videoflash.eval.niah import main as niah_main

    make_niah(["--haystack", str(haystack), "--out", str(tmp_path / "d"), "--lengths", "4,8", "--depths", "0,1"])
    export = write_export(tmp_path / "export")
    assert niah_main([f"data={tmp_path / 'd'}", f"model={export}", f"out={tmp_path / 'r'}"]) == 0
    res = json.loads((tmp_path / "r/niah.json").read_text())
    assert res["lengths"] == [4, 8] and res["depths"] == [0.0, 1.0] and res["total"] == 4
    assert all(v in (0.0, 1.0) for row in res["accuracy_grid"] for v in row)
    assert res["accuracy"] == pytest.approx(sum(p["correct"] for p in res["predictions"]) / 4)
    img = Image.open(tmp_path / "r/niah_heatmap.png")
    img.load()
    assert img.format == "PNG" and img.size == (800, 400)
    colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 10  # not blank: axes, labels, cells, colour bar
    # every cell is 0 or 1, so the cells are painted in the colour map's ends (red #F0496E, green #0CD79F)
    px = np.asarray(img.convert("RGB")).reshape(-1, 3).astype(int)
    ends = {v for row in res["accuracy_grid"] for v in row}
    for v, rgb in ((0.0, (0xF0, 0x49, 0x6E)), (1.0, (0x0C, 0xD7, 0x9F))):
        if v in ends:
            assert (np.abs(px - rgb).max(1) < 4).sum() > 1000, v


def test_niah_scores_with_kv_compression_and_visual_dropout(tmp_path, haystack):
    from videoflash.eval.niah import main as niah_main

    make_niah(["--haystack", str(haystack), "--out", str(tmp_path / "d"), "--lengths", "12", "--depths", "0,1",
               "--hops", "3"])
    export = write_export(tmp_path / "export")
    for name, opts in (("kv", ["kv_compression=adaretake", "kv_budget=24"]),
                       ("drop", ["visual_dropout=2:0.5:uniform", "policy=dynamic_fps1", "max_frames=8"])):
        assert niah_main([f"data={tmp_path / 'd'}", f"model={export}", f"out={tmp_path / name}", *opts]) == 0
        res = json.loads((tmp_path / name / "niah.json").read_text())
        assert res["hops"] == 3 and res["total"] == 2 and all(p["output"] is not None for p in res["predictions"])
    with pytest.raises(SystemExit, match="max_frames must be an integer"):
        niah_main([f"data={tmp_path / 'd'}", f"model={export}", "max_frames=many"])


def test_word_answers_for_models_trained_to_answer_in_words(tmp_path, haystack):
    """``--answer word``: the question alone (no options, no post-prompt), the colour's name as the
    answer, and a reply counts when it is that name once lower-cased and stripped of punctuation."""
    import string

    from videoflash.eval.niah import main as niah_main

    q = "A colored shape appeared briefly in the video. What color was it?"
    assert make_niah(["--haystack", str(haystack), "--out", str(tmp_path / "d"), "--lengths", "4,8",
                      "--depths", "0,1", "--answer", "word", "--question", q]) == 0
    records = json.loads((tmp_path / "d/niah.json").read_text())["records"]
    assert [r["prompt"] for r in records] == [q] * 4
    assert all(r["answer"] == r["needle_color"] and r["answer_style"] == "word" for r in records)
    export = write_export(tmp_path / "export")
    assert niah_main([f"data={tmp_path / 'd'}", f"model={export}", f"out={tmp_path / 'r'}"]) == 0
    res = json.loads((tmp_path / "r/niah.json").read_text())
    colour = {r["id"]: r["needle_color"] for r in records}
    for p in res["predictions"]:
        said = p["output"].strip(string.whitespace + string.punctuation).lower()
        assert p["pred"] == said and p["correct"] == (said == colour[p["id"]])
    with pytest.raises(SystemExit):
        make_niah(["--haystack", str(haystack), "--out", str(tmp_path / "e"), "--answer", "sentence"])


def test_corpus_haystack_is_the_long_video_without_its_needle():
    """``render_long(needle=False)`` draws the same video frame for frame, except that the needle's
    frames keep only the haystack: a haystack in the corpus's own style for make_niah."""
    from data_tools.synth_videos import SynthConfig, render_long

    cfg = SynthConfig(height=48, width=64, long_duration=(30.0, 30.0))
    spec = {"seed": [3, 1, 1, 0]}
    with_needle, facts = render_long(spec, cfg)
    hay, _ = render_long(spec, cfg, needle=False)
    t = np.arange(len(hay)) / cfg.long_fps
    inside = (t >= facts["needle_start"]) & (t < facts["needle_end"])
    assert inside.sum() == int(cfg.needle_seconds * cfg.long_fps)
    assert np.array_equal(hay[~inside], with_needle[~inside])
    differs = (hay[inside] != with_needle[inside]).any(axis=(1, 2, 3))
    assert differs.all()
    colour = np.array(COLORS[facts["needle_color"]], np.uint8)
    assert not (hay == colour).all(-1).any()  # no needle colour anywhere in the haystack
