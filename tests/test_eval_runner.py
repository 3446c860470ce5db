"""The offline benchmark runner over fixture directories in each published format: every question
asked and scored once, per-category totals as in the files, resume from the cache without model
calls, and two data-parallel ranks (torchrun over gloo) giving the one-rank records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench_fixtures import write_benchmark, write_export
from videoflash.eval import benchmarks as B
from videoflash.eval.runner import AskSettings, read_cache, run

REPO = Path(__file__).resolve().parents[1]
SETTINGS = AskSettings(max_frames=8, min_frames=4, max_new_tokens=4)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return write_export(tmp_path_factory.mktemp("export"))


@pytest.mark.parametrize("name", list(B.BENCHMARKS))
def test_each_format_runs_and_counts_every_question(name, tmp_path, export):
    n = write_benchmark(name, tmp_path / "data")
    summary = run(name, str(tmp_path / "data"), str(export), str(tmp_path / "out"), SETTINGS, progress=False)
    assert summary["total"] == n
    saved = json.loads((tmp_path / "out" / f"{name}.json").read_text())
    assert len(saved["predictions"]) == n
    for axis, vals in saved["categories"].items():
        assert sum(c["total"] for c in vals.values()) == n, axis
    # the accuracy is the share of replies that the benchmark's rule maps to the gold letter
    bench = B.get_benchmark(name)
    samples = {s.id: s for s in bench.load(tmp_path / "data")}
    expect = sum(bench.score(samples[p["id"]], p["output"])[1] for p in saved["predictions"]) / n
    assert saved["accuracy"] == pytest.approx(expect)


def test_expected_answers_come_from_the_published_fields(tmp_path):
    write_benchmark("mvbench", tmp_path / "m")
    got = {s.id: (s.answer, s.choices, s.start, s.end) for s in B.get_benchmark("mvbench").load(tmp_path / "m")}
    assert got["action_sequence/0"] == ("B", list("ABC"), None, None)
    assert got["action_sequence/1"] == ("A", list("AB"), 0.5, 2.5)
    assert got["fine_grained_action/0"][0] == "D"
    write_benchmark("longvideobench", tmp_path / "l")
    lvb = {s.id: (s.answer, s.choices) for s in B.get_benchmark("longvideobench").load(tmp_path / "l")}
    assert lvb == {"q0": ("A", list("ABCD")), "q1": ("B", list("ABC"))}
    write_benchmark("perceptiontest", tmp_path / "p")
    assert [s.answer for s in B.get_benchmark("perceptiontest").load(tmp_path / "p")] == ["A", "B"]


def test_missing_video_names_the_record(tmp_path):
    write_benchmark("videomme", tmp_path / "d")
    (tmp_path / "d/data/v2.mp4").unlink()
    with pytest.raises(FileNotFoundError, match=r"videomme.json\[2\].*v2"):
        B.get_benchmark("videomme").load(tmp_path / "d")


def test_a_frame_folder_is_named(tmp_path):
    write_benchmark("mvbench", tmp_path / "d")
    (tmp_path / "d/video/Moments_in_Time_Raw/videos/b.mp4").unlink()
    (tmp_path / "d/video/Moments_in_Time_Raw/videos/b.mp4").mkdir()
    with pytest.raises(ValueError, match="is a folder of frames"):
        B.get_benchmark("mvbench").load(tmp_path / "d")


def test_resume_uses_the_cache_and_asks_only_the_rest(tmp_path, export):
    write_benchmark("videomme", tmp_path / "data")
    cache = tmp_path / "out" / "cache"
    cache.mkdir(parents=True)
    # a previous (killed) run answered two questions, one right, one wrong, and tore its last line
    prior = [{"id": "v1-0", "output": "The best answer is C.", "pred": "C", "answer": "C", "correct": True,
              "categories": {"duration": "short", "domain": "Knowledge", "task_type": "Counting Problem"}},
             {"id": "v1-1", "output": "D", "pred": "D", "answer": "A", "correct": False,
              "categories": {"duration": "short", "domain": "Knowledge", "task_type": "OCR Problems"}}]
    (cache / "videomme.rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prior) + '{"id": "v2-')
    s1 = run("videomme", str(tmp_path / "data"), str(export), str(tmp_path / "out"), SETTINGS, progress=False)
    assert s1["new_samples_rank0"] == 2
    preds = {p["id"]: p for p in json.loads((tmp_path / "out/videomme.json").read_text())["predictions"]}
    assert preds["v1-0"]["output"] == "The best answer is C." and preds["v1-1"]["output"] == "D"
    short = s1["categories"]["duration"]["short"]
    assert (short["correct"], short["total"]) == (1, 2)
    lines = (cache / "videomme.rank0.jsonl").read_text().splitlines()
    s2 = run("videomme", str(tmp_path / "data"), str(export), str(tmp_path / "out"), SETTINGS, progress=False)
    assert s2["new_samples_rank0"] == 0
    assert (cache / "videomme.rank0.jsonl").read_text().splitlines() == lines  # nothing asked again
    assert s2["accuracy"] == s1["accuracy"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_give_the_one_rank_records(tmp_path, export):
    write_benchmark("lvbench", tmp_path / "data")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["bench=lvbench", f"data={tmp_path / 'data'}", f"model={export}", "max_frames=8", "min_frames=4",
            "max_new_tokens=4"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                    "-m", "videoflash.eval", *args, f"out={tmp_path / 'two'}"], check=True, env=env, cwd=REPO,
                   capture_output=True)
    one = run("lvbench", str(tmp_path / "data"), str(export), str(tmp_path / "one"), SETTINGS, progress=False)
    ranks = sorted(p.name for p in (tmp_path / "two/cache").iterdir())
    assert ranks == ["lvbench.rank0.jsonl", "lvbench.rank1.jsonl"]
    two = json.loads((tmp_path / "two/lvbench.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    strip = lambda recs: sorted((r["id"], r["output"], r["correct"]) for r in recs)  # noqa: E731
    assert strip(two["predictions"]) == strip(read_cache(tmp_path / "one/cache", "lvbench").values())
    assert two["accuracy"] == one["accuracy"]


def test_scores_go_to_wandb_offline(tmp_path, export, monkeypatch):
    from videoflash.eval.runner import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    write_benchmark("mlvu", tmp_path / "data")
    assert main(["bench=mlvu", f"data={tmp_path / 'data'}", f"model={export}", f"out={tmp_path / 'out'}",
                 "max_frames=8", "min_frames=4", "max_new_tokens=4", "wandb=offline"]) == 0
    logs = list((tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    data = logs[0].read_bytes()
    assert b"mlvu/accuracy" in data and b"mlvu/task_type/plotQA" in data and b"mlvu/task_type/order" in data


def test_bad_keys_are_named():
    from videoflash.eval.runner import parse_overrides

    with pytest.raises(SystemExit, match="unknown key 'frames'"):
        parse_overrides(["bench=mlvu", "data=d", "model=m", "frames=3"])
    with pytest.raises(SystemExit, match="max_frames must be an integer"):
        parse_overrides(["bench=mlvu", "data=d", "model=m", "max_frames=x"])
    from videoflash.eval.runner import main

    with pytest.raises(SystemExit, match="unknown benchmark 'egoschema'"):
        main(["bench=egoschema", "data=d", "model=m"])
    with pytest.raises(SystemExit, match="missing model"):
        parse_overrides(["bench=mlvu", "data=d"])


def test_a_warning_of_every_question_shows_once(tmp_path):
    import warnings

    from videoflash.eval.runner import main

    short = write_export(tmp_path / "short", text={"max_position_embeddings": 64})  # every prompt overflows
    write_benchmark("lvbench", tmp_path / "data")
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        assert main(["bench=lvbench", f"data={tmp_path / 'data'}", f"model={short}", f"out={tmp_path / 'out'}",
                     "max_frames=8", "min_frames=8", "max_new_tokens=2"]) == 0
    overflow = [w for w in got if "beyond the LLM's 64 positions" in str(w.message)]
    assert len(overflow) == 1  # three questions, each would warn
