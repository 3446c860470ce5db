"""Evaluation throughput of the offline runner (samples/s) at 64 and 512 frames per question.

    python scripts/bench_eval.py [--questions 8] [--out /tmp/bench_eval]

A tiny random VideoFlash (tests/inference_helpers.py: width 64, 4 layers, 64 px frames) is exported,
a VideoMME-format directory of ``--questions`` distinct 128 s videos (4 fps, 512 frames, so no two
questions share the chat's visual cache) is written, and the runner
(``videoflash.eval.runner.run``, greedy, 16 new tokens) answers every question with exactly 64 and
then exactly 512 frames (``min_frames = max_frames``), fresh cache each time. Each line gives the
samples/s and the frames/s; the last line gives the 512-frame rate relative to the 64-frame one
measured in the same run (1/8 would mean the cost is all per-frame).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.bench_fixtures import write_export  # noqa: E402
from tests.inference_helpers import write_mp4  # noqa: E402
from videoflash.eval.runner import AskSettings, run  # noqa: E402


def write_data(root: str, questions: int) -> None:
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    recs = []
    for i in range(questions):
        write_mp4(os.path.join(root, "data", f"v{i}.mp4"), 512, fps=4, width=64, height=64)
        recs.append({"videoID": f"v{i}", "question_id": f"v{i}-0", "duration": "long", "domain": "Knowledge",
                     "sub_category": "Astronomy", "task_type": "Counting Problem", "question": "How many?",
                     "options": ["A. 1", "B. 2", "C. 3", "D. 4"], "answer": "ABCD"[i % 4]})
    with open(os.path.join(root, "videomme.json"), "w") as f:
        json.dump(recs, f)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--out", default="/tmp/bench_eval")
    a = p.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    from pathlib import Path

    export = write_export(Path(a.out) / "export", text={"max_position_embeddings": 4096})
    write_data(os.path.join(a.out, "data"), a.questions)
    rates = {}
    for frames in (64, 512):
        out = os.path.join(a.out, f"run{frames}")
        t0 = time.perf_counter()
        s = run("videomme", os.path.join(a.out, "data"), str(export), out,
                AskSettings(max_frames=frames, min_frames=frames), progress=False)
        wall = time.perf_counter() - t0  # with model load; the runner's own rate excludes it
        rates[frames] = s["samples_per_s_rank0"]
        print(f"{frames} frames: {rates[frames]:.3f} samples/s ({rates[frames] * frames:.0f} frames/s), "
              f"{s['total']} questions, {wall:.1f} s with model load")
    print(f"eval throughput: 512 frames {rates[512]:.3f} samples/s, 64 frames {rates[64]:.3f} samples/s, "
          f"ratio 512/64 = {rates[512] / rates[64]:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
