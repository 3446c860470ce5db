"""The quickstart model's evaluation figures: offline-runner scores on the synthetic fixtures of the
six benchmark formats, and its single-hop NIAH heatmap.

    python scripts/quickstart_eval.py [--model runs/quickstart/stage4/export] [--out runs/quickstart/eval]
    make eval-figures          # the same, after make quickstart

The fixtures are those of the tests (tests/bench_fixtures.py: a few questions per format over flat
synthetic mp4 files), so the scores say that the whole path runs on a trained export, not how good
it is. The NIAH grid asks the quickstart model in its own terms: the haystack is a needle-free long
video of the synthetic corpus (the grey square drifting and bouncing, ``render_long(needle=False)``),
read at 1 fps, 16..256 frames, depths 0, 0.25, ..., 1, a 4-frame needle (``make_niah
--needle-frames 4 --answer word``), the corpus's needle question (its training prompt), and the
colour's name as the answer (the tiny model was trained to answer in words, not letters); frames as
stages 3-4 train (fps:1, at most ``--max-frames``, default 32). Results land in ``--out``
(``<bench>.json`` per benchmark, which the export's model card tables when ``--out`` is
``<stage dir>/eval``; ``niah/niah.json``, ``niah/niah_heatmap.png``).
The last line is the NIAH accuracy and the mean benchmark accuracy.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_tools.make_niah import build  # noqa: E402
from tests.bench_fixtures import write_benchmark  # noqa: E402
from data_tools.media import write_mp4  # noqa: E402
from data_tools.synth_videos import SynthConfig, prompt_for, render_long  # noqa: E402
from videoflash.eval import benchmarks as B  # noqa: E402
from videoflash.eval import niah  # noqa: E402
from videoflash.eval.runner import AskSettings, load_model, run, table  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="runs/quickstart/stage4/export")
    p.add_argument("--out", default="runs/quickstart/eval")
    p.add_argument("--lengths", default="16,32,64,128,256")
    p.add_argument("--max-frames", type=int, default=32, help="frames the model sees at most (stages 3-4 train on 8..32)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = Path(a.out)
    accs = []
    for name in B.BENCHMARKS:
        data = out / "fixtures" / name
        if not data.exists():
            write_benchmark(name, data)
        s = run(name, str(data), a.model, str(out), AskSettings(max_frames=8, min_frames=4), progress=False)
        print(table(s))
        accs.append(s["accuracy"])
    lengths = [int(x) for x in a.lengths.split(",")]
    cfg = SynthConfig(long_duration=(max(lengths), max(lengths)))
    hay = out / "niah" / "haystack.mp4"
    hay.parent.mkdir(parents=True, exist_ok=True)
    frames, _ = render_long({"seed": [a.seed, 99]}, cfg, needle=False)
    write_mp4(str(hay), frames, cfg.long_fps)
    build([str(hay)], str(out / "niah" / "data"), lengths, [0, 0.25, 0.5, 0.75, 1.0], needle_frames=4,
          seed=a.seed, question=prompt_for("needle_color"), answer="word")
    model, proc = load_model(a.model, policy="fps:1", min_frames=1, max_frames=a.max_frames)
    res = niah.score_grid(model, proc, out / "niah" / "data", max_frames=a.max_frames)
    niah.draw_heatmap(res, out / "niah" / "niah_heatmap.png", title=f"quickstart model, single-hop NIAH (at most {a.max_frames} frames): "
                      f"{100 * res['accuracy']:.1f}%")
    import json

    (out / "niah" / "niah.json").write_text(json.dumps(res, indent=1))
    print(f"NIAH single-hop accuracy {100 * res['accuracy']:.1f}% over {res['total']} videos "
          f"({out / 'niah' / 'niah_heatmap.png'}); benchmark fixtures mean accuracy {100 * sum(accs) / len(accs):.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
