"""Training throughput through the real engine, as users read it: tokens/s per device, TFLOP/s per
device, the vision tower's share of the FLOPs, MFU where the device's peak is known; packed rows
against padded micro-batches on the same data.

    python scripts/bench_train.py [--steps 12] [--stage 3] [--pack-tokens 2048] [--batch 4] [-- overrides...]

Each side is one ``python -m videoflash.train`` run (torchrun, one process, DeepSpeed ZeRO-3; on CPU
fp32 over gloo) of the quickstart experiment's tiny model on a small synthetic corpus sharded once
under ``--workdir``, from the parts (``stage.init=parts``), with the same seed and so the same sample
stream:

- **padded**: micro-batches of ``--batch`` samples, right-padded to the longest (``data.pack_tokens``
  off);
- **packed**: micro-batches of one row of at most ``--pack-tokens`` tokens (``data.pack_tokens``).

The figures are read back from each run's ``metrics.jsonl`` (what the progress bar and wandb show),
as the median over the steps after the first (start-up, first batch). Anything after ``--`` is passed
to both runs (e.g. ``model=umtl_qwen25_1p5b_448 train.precision=bf16`` on a GPU machine). The last
line prints both token rates and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def prepare(workdir: Path, num_samples: int) -> Path:
    """A synthetic corpus (a quarter long videos) and its shards, made once."""
    from data_tools.synth_videos import SynthConfig, generate_corpus

    root = workdir / f"trainmix_{num_samples}"
    if not (root / "heldout.jsonl").is_file():
        generate_corpus(str(root), SynthConfig(num_train=num_samples, num_heldout=8, long_fraction=0.25,
                                               images=num_samples // 8, long_duration=(20.0, 40.0), seed=0),
                        workers=1, progress=False)
    if not (root / "shards" / "train-index.json").is_file():
        subprocess.run([sys.executable, "-m", "data_tools.make_shards", "--annotations", str(root / "train.jsonl"),
                        "--media-root", str(root), "--out", str(root / "shards"), "--prefix", "train",
                        "--max-samples-per-shard", "32", "--workers", "1"], check=True, capture_output=True)
    return root


def train(name: str, overrides: list[str], workdir: Path) -> list[dict]:
    """One engine run; its step records."""
    run_root = workdir / f"run_{name}"
    env = dict(os.environ, WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/videoflash/torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
           "videoflash.train", *overrides, f"run_root={run_root}", "resume=never"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if res.returncode:
        raise SystemExit(f"[bench_train] the {name} run failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    metrics = next(run_root.glob("stage*/metrics.jsonl"))
    return [r for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r and "step" in r]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def summary(records: list[dict]) -> dict:
    steady = records[1:] or records
    med = lambda key: statistics.median(r[key] for r in steady)  # noqa: E731
    out = {key: med(key) for key in ("tokens_per_s_per_device", "tflops_per_s_per_device", "vision_flops_share",
                                     "s_per_step")}
    out["samples_per_step"] = statistics.mean(r["samples"] for r in steady)
    out["tokens_per_step"] = statistics.mean(r["tokens"] for r in steady)
    for key in ("mfu", "mfu_llm"):
        if key in steady[0]:
            out[key] = med(key)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "videoflash_bench_train")
    p.add_argument("--num-samples", type=int, default=96, help="samples in the synthetic corpus")
    p.add_argument("--stage", type=int, default=3, help="the recipe whose frames and parts train")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=4, help="padded side: samples per micro-batch")
    p.add_argument("--pack-tokens", type=int, default=2048, help="packed side: tokens per row")
    p.add_argument("--global-rows", type=int, default=4, help="micro-batches per optimizer step, both sides")
    a = p.parse_args(argv)
    root = prepare(a.workdir, a.num_samples)
    common = ["experiment=quickstart", "deepspeed=zero3", f"stage={a.stage}", "stage.init=parts", f"data.root={root}",
              f"stage.max_steps={a.steps}", "train.checkpoint_every=0", "train.progress_bar=false",
              "train.log_every=1", "data.num_workers=1", f"stage.max_tokens={a.pack_tokens}"]
    sides = {
        "padded": [f"stage.micro_batch_size={a.batch}", f"stage.global_batch_size={a.batch * a.global_rows}"],
        "packed": [f"data.pack_tokens={a.pack_tokens}", "stage.micro_batch_size=1",
                   f"stage.global_batch_size={a.global_rows}"],
    }
    results = {}
    for name, own in sides.items():
        print(f"[bench_train] {name}: {a.steps} steps ...", flush=True)
        results[name] = summary(train(name, [*common, *own, *extra], a.workdir))
        r = results[name]
        mfu = f", MFU {r['mfu']:.1%} (LLM alone {r['mfu_llm']:.1%})" if "mfu" in r else ""
        print(f"  {name:>6}: {r['tokens_per_s_per_device']:8.0f} tok/s per device, "
              f"{r['tflops_per_s_per_device']:.4f} TFLOP/s per device (vision {r['vision_flops_share']:.0%}){mfu}, "
              f"{r['samples_per_step']:.1f} samples / {r['tokens_per_step']:.0f} tokens per step, "
              f"{r['s_per_step']:.2f} s/step", flush=True)
    ratio = results["packed"]["tokens_per_s_per_device"] / results["padded"]["tokens_per_s_per_device"]
    print(f"tokens/s per device: packed {results['packed']['tokens_per_s_per_device']:.0f}, "
          f"padded {results['padded']['tokens_per_s_per_device']:.0f}, packed/padded = {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
