"""``make quickstart``: proof that the framework learns, on a CPU, in minutes.

1. Generates the synthetic corpus (``data_tools.synth_videos``) and shards it
   (``data_tools.make_shards``) under ``data/quickstart`` unless it is there already.
2. Runs the four stages with the tiny model (``python -m videoflash.train experiment=quickstart
   stage=N``, one process, DeepSpeed ZeRO-1 on CPU: one rank has nothing for ZeRO-3 to shard), each
   starting from the previous stage's export.
3. After each stage, evaluates the export on the held-out questions (greedy answer, exact match) with
   the frames the stage trained on, and prints a table: stage, steps, minutes, loss, the accuracy of
   its starting point under the stage's frames and image size (stage 4: the stage-3 model at the high
   resolution, before any stage-4 step), accuracy, chance, and the needle questions on the longest
   half of the long videos.

Extra arguments are passed to every stage (``python -m videoflash.quickstart stage.max_steps=5``);
``--fresh`` starts over (removes the run directory, keeps the corpus).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from videoflash.console import quiet_known_noise

EXPERIMENT = "experiment=quickstart"


def _compose(stage: int, extra: list[str]):
    from videoflash.config import compose, validate

    return validate(compose([EXPERIMENT, f"stage={stage}", *extra]))


def make_corpus(cfg) -> None:
    """The synthetic corpus and its shards, generated once."""
    from data_tools.synth_videos import SynthConfig, generate_corpus

    root = Path(cfg.data.root)
    synth = cfg.data.synthetic
    # SynthConfig's fields as meta.json records them (tuples as lists)
    wanted = {"num_train": synth.num_train, "num_heldout": synth.num_heldout, "seed": synth.seed,
              "train_questions": synth.train_questions, "shape_scale": [float(x) for x in synth.shape_scale],
              "long_fraction": float(synth.long_fraction)}
    # a field a meta.json lacks predates its option, whose default keeps the behaviour from before it
    defaults = json.loads(json.dumps(asdict(SynthConfig())))
    meta = root / "meta.json"
    if meta.is_file():
        made = json.loads(meta.read_text()).get("config", {})
        stale = [k for k, v in wanted.items() if made.get(k, defaults[k]) != v]
        if stale:
            print(f"[quickstart] {root} was generated with other {', '.join(stale)}; generating it anew", flush=True)
            shutil.rmtree(root)
    if not (root / "heldout.jsonl").is_file():
        print(f"[quickstart] generating the synthetic corpus in {root} ...", flush=True)
        generate_corpus(str(root), SynthConfig(**{**wanted, "shape_scale": tuple(wanted["shape_scale"])}))
    if not (root / "shards" / "train-index.json").is_file():
        print("[quickstart] sharding it ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "data_tools.make_shards", "--annotations", str(root / "train.jsonl"),
             "--media-root", str(root), "--out", str(root / "shards"), "--prefix", "train",
             "--max-samples-per-shard", str(max(1, synth.num_train // 4))],
            check=True,
        )


def last_loss(metrics: Path, window: int = 10) -> tuple[int, float]:
    """(last step, mean loss of the last ``window`` steps) from a stage's metrics.jsonl."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    tail = steps[-window:]
    return steps[-1]["step"], sum(r["loss"] for r in tail) / len(tail)


def evaluate_stage(cfg, of_stage: int | None = None, quiet: bool = False) -> dict:
    """Held-out scores of the stage's export (or of stage ``of_stage``'s, e.g. its starting point)
    with the frames and the image size the stage trains on."""
    import torch

    from videoflash.eval.synthetic import FrameSettings, evaluate_export
    from videoflash.train.stages import export_dir

    torch.set_num_threads(os.cpu_count() or 1)
    s = cfg.stage
    fs = FrameSettings(image_size=s.image_size, policy=s.frames.sampling, min_frames=s.frames.min_frames,
                       max_frames=s.frames.max_frames, frames_per_clip=cfg.model.vision.frames_per_clip,
                       image_mode=s.image_mode, max_grid=cfg.model.max_grid)
    result = evaluate_export(export_dir(cfg.run_root, s.id if of_stage is None else of_stage), cfg.data.heldout, fs,
                             batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                             max_samples=cfg.eval.max_samples, progress=not quiet)
    if quiet:
        return result.to_dict()
    print(result.table(), flush=True)
    scores = result.to_dict()
    scores["needle_longest"] = needle_on_longest(result.predictions)
    if scores["needle_longest"]["total"]:
        n = scores["needle_longest"]
        print(f"needle questions on the longest half of the long videos (>= {n['min_seconds']:.0f} s): "
              f"{n['correct']}/{n['total']} = {n['accuracy']:.3f}", flush=True)
    return scores


def needle_on_longest(predictions: list[dict]) -> dict:
    """Accuracy of the needle questions (``needle_*`` tasks) on the longest half of their videos: those
    at least as long as the median duration of the long videos asked about."""
    needles = [p for p in predictions if str(p.get("task", "")).startswith("needle") and p.get("duration")]
    if not needles:
        return {"correct": 0, "total": 0, "accuracy": 0.0, "min_seconds": 0.0}
    durations = sorted(float(p["duration"]) for p in needles)
    cut = durations[len(durations) // 2]  # the (upper) median: half of them, or one more when odd
    longest = [p for p in needles if float(p["duration"]) >= cut]
    correct = sum(bool(p["correct"]) for p in longest)
    return {"correct": correct, "total": len(longest), "accuracy": correct / len(longest), "min_seconds": cut}


def table(rows: list[dict]) -> str:
    lines = ["| stage | trains | steps | minutes | loss | accuracy at start | accuracy | chance | needle, longest half |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n = r.get("needle_longest") or {"total": 0}
        needle = f"{n['accuracy']:.3f} ({n['correct']}/{n['total']})" if n["total"] else "-"
        start = r.get("start_accuracy")
        start = "-" if start is None else f"{start:.3f}"
        lines.append(f"| {r['stage']} | {r['trains']} | {r['steps']} | {r['minutes']:.1f} | {r['loss']:.3f} "
                     f"| {start} | {r['accuracy']:.3f} | {r['chance']:.3f} | {needle} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m videoflash.quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--fresh", action="store_true", help="remove the quickstart run directory first")
    p.add_argument("overrides", nargs="*", help="config overrides for every stage (key=value)")
    a = p.parse_args(argv)
    quiet_known_noise()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/videoflash/torch_extensions"))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    start = time.time()
    first = _compose(1, a.overrides)
    if a.fresh and Path(first.run_root).exists():
        shutil.rmtree(first.run_root)
    make_corpus(first)
    print(f"[quickstart] corpus ready ({(time.time() - start) / 60:.1f} min)", flush=True)

    rows = []
    for stage in (1, 2, 3, 4):
        cfg = _compose(stage, a.overrides)
        start_scores = None
        if stage > 1:  # what the stage starts from, under its own frames and image size
            start_scores = evaluate_stage(cfg, of_stage=stage - 1, quiet=True)
            print(f"[quickstart] stage {stage} starts from stage {stage - 1}'s export, which answers "
                  f"{start_scores['accuracy']:.3f} at {cfg.stage.image_size} px, {cfg.stage.frames.min_frames}.."
                  f"{cfg.stage.frames.max_frames} frames", flush=True)
        t0 = time.time()
        cmd = [sys.executable, "-m", "videoflash.train", EXPERIMENT, f"stage={stage}", *a.overrides]
        print(f"\n[quickstart] stage {stage}: {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.run(cmd).returncode
        if rc:
            print(f"[quickstart] stage {stage} failed (exit {rc})", file=sys.stderr)
            return rc
        minutes = (time.time() - t0) / 60
        steps, loss = last_loss(Path(cfg.run_root) / f"stage{stage}" / "metrics.jsonl")
        print(f"[quickstart] evaluating stage {stage} on {cfg.data.heldout} ...", flush=True)
        scores = evaluate_stage(cfg)
        rows.append({"stage": stage, "trains": "+".join(p.replace("_", " ") for p in cfg.stage.trainable),
                     "steps": steps, "minutes": minutes, "loss": loss, **scores,
                     "start_accuracy": start_scores["accuracy"] if start_scores else None,
                     "start_tasks": start_scores["tasks"] if start_scores else None})

    out = table(rows)
    total = (time.time() - start) / 60
    print(f"\n[quickstart] done in {total:.1f} min (loss: mean of the last 10 steps; accuracy: exact-match greedy "
          f"answers on {rows[-1]['total']} held-out questions; chance: uniform guess among each task's choices)\n")
    print(out)
    report = Path(first.run_root) / "quickstart.md"
    report.write_text(out + f"\n\nTotal: {total:.1f} min\n")
    (Path(first.run_root) / "quickstart.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
