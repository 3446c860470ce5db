"""Needle-in-a-haystack scoring and its heatmap (length x depth, accuracy as colour).

``python -m videoflash.eval.niah data=<dir of data_tools.make_niah> model=<export dir> [out=<dir>]
[policy=fps:1] [max_frames=N] [visual_dropout=published] [kv_compression=adaretake kv_budget=N]``

Every video of the grid is asked its question with ``model.chat`` (greedy, 16 new tokens); by
default every frame is taken (``policy=fps:1``, ``max_frames`` = the video's length), any frame
policy, visual dropout or KV compression can be set instead. The reply's letter is read by the
VideoMME rule (``benchmarks.extract_letter_videomme``); a grid made with ``--answer word`` counts a
reply that is the colour's name (lower-cased, stripped of spaces and punctuation). Writes
``<out>/niah.json`` (the grid and every reply) and ``<out>/niah_heatmap.png``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .benchmarks import extract_letter_videomme
from .synthetic import normalize_answer


def score_grid(model, processor, data_dir: str | Path, *, max_frames: int | None = None, visual_dropout=None,
               kv_compression=None, kv_budget=None, max_new_tokens: int = 16, progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "niah.json").read_text())
    kv = {"kv_compression": kv_compression, "kv_budget": kv_budget} if kv_compression else {}
    rows = []
    for rec in tqdm(meta["records"], desc="niah", unit="video", disable=not progress, file=sys.stderr):
        reply = model.chat(str(data_dir / rec["video"]), rec["prompt"], processor=processor,
                           max_frames=max_frames or rec["length"], min_frames=1, visual_dropout=visual_dropout,
                           generation_config={"do_sample": False, "max_new_tokens": max_new_tokens}, **kv)
        if rec.get("answer_style", "letter") == "word":  # the colour's name, exact match after normalising
            pred = normalize_answer(reply)
        else:
            pred = extract_letter_videomme(reply)
        rows.append({"id": rec["id"], "length": rec["length"], "depth": rec["depth"], "output": reply, "pred": pred,
                     "answer": rec["answer"], "correct": pred == rec["answer"]})
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    grid = [[None] * len(lengths) for _ in depths]
    for d_i, d in enumerate(depths):
        for l_i, n in enumerate(lengths):
            cell = [r["correct"] for r in rows if r["length"] == n and r["depth"] == d]
            if cell:
                grid[d_i][l_i] = sum(cell) / len(cell)
    return {"hops": meta.get("hops", 1), "lengths": lengths, "depths": depths, "accuracy_grid": grid,
            "accuracy": sum(r["correct"] for r in rows) / max(1, len(rows)), "total": len(rows), "predictions": rows}


def draw_heatmap(result: dict[str, Any], path: str | Path, title: str | None = None, dpi: int = 100,
                 size: tuple[float, float] = (8.0, 4.0)) -> Path:
    """The paper-style heatmap: frames on x, depth on y, accuracy from red (0) to green (1)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    grid = np.array([[np.nan if v is None else v for v in row] for row in result["accuracy_grid"]], dtype=float)
    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    im = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(result["lengths"])), [str(n) for n in result["lengths"]])
    ax.set_yticks(range(len(result["depths"])), [f"{100 * d:.0f}%" for d in result["depths"]])
    ax.set_xlabel("frames")
    ax.set_ylabel("needle depth")
    hop = "single-hop" if result.get("hops", 1) == 1 else f"multi-hop ({result['hops'] - 1} clues)"
    ax.set_title(title or f"NIAH {hop}: accuracy {100 * result['accuracy']:.1f}%")
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    import os

    from .runner import load_model

    args = sys.argv[1:] if argv is None else argv
    opts: dict[str, str] = {}
    known = {"data", "model", "out", "policy", "max_frames", "visual_dropout", "kv_compression", "kv_budget"}
    for a in args:
        k, sep, v = a.partition("=")
        if not sep or k not in known:
            raise SystemExit(f"expected one of {', '.join(sorted(known))} as key=value, got {a!r}")
        opts[k] = v
    for k in ("data", "model"):
        if k not in opts:
            raise SystemExit(f"missing {k}=...  (python -m videoflash.eval.niah data=<niah dir> model=<export dir>)")
    ints = {}
    for k in ("max_frames", "kv_budget"):
        if k in opts:
            try:
                ints[k] = int(opts[k])
            except ValueError:
                raise SystemExit(f"{k} must be an integer, got {opts[k]!r}") from None
    model, processor = load_model(opts["model"], policy=opts.get("policy", "fps:1"), min_frames=1,
                                  max_frames=ints.get("max_frames", 100000))
    result = score_grid(model, processor, opts["data"], max_frames=ints.get("max_frames"),
                        visual_dropout=opts.get("visual_dropout"), kv_compression=opts.get("kv_compression"),
                        kv_budget=ints.get("kv_budget"))
    out = Path(opts.get("out") or os.path.join(opts["data"], "results"))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "niah.json", "w") as f:
        json.dump({**result, "model": opts["model"], "options": opts}, f, indent=1)
    png = draw_heatmap(result, out / "niah_heatmap.png")
    print(f"NIAH accuracy {100 * result['accuracy']:.1f}% over {result['total']} videos; wrote {out / 'niah.json'} and {png}")
    return 0


if __name__ == "__main__":
    from videoflash.console import quiet_known_noise

    quiet_known_noise()
    raise SystemExit(main())
