"""Generic fixtures: a tiny synthetic corpus with its shards, and the environment of a CPU DeepSpeed run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """``data_tools.synth_videos`` (48 train / 16 held-out records, a few long videos) sharded by
    ``data_tools.make_shards`` into ``shards/train-*.tar`` + ``shards/train-index.json``."""
    from data_tools.synth_videos import SynthConfig, generate_corpus

    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(str(root), SynthConfig(num_train=48, num_heldout=16, long_fraction=0.1,
                                           long_duration=(30.0, 40.0)), workers=1, progress=False)
    subprocess.run(
        [sys.executable, "-m", "data_tools.make_shards", "--annotations", str(root / "train.jsonl"),
         "--media-root", str(root), "--out", str(root / "shards"), "--prefix", "train",
         "--max-samples-per-shard", "12", "--workers", "1"],
        check=True, capture_output=True,
    )
    return root


@pytest.fixture(scope="session")
def ds_env() -> dict[str, str]:
    """Environment of a CPU DeepSpeed subprocess (gloo, cached JIT op, wandb offline, 1 thread)."""
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/videoflash/torch_extensions")),
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    return env


@pytest.fixture(scope="session")
def tiny_overrides(tiny_corpus):
    """Config overrides of a few-step run of the tiny model on the tiny corpus in ``run_root``."""

    def make(run_root, steps: int = 2, extra=()) -> list[str]:
        return [
            f"data.root={tiny_corpus}",
            f"run_root={run_root}",
            f"stage.max_steps={steps}",
            "stage.global_batch_size=4",
            "stage.micro_batch_size=2",
            "stage.frames.min_frames=4",
            "stage.frames.max_frames=8",
            "data.num_workers=0",
            "train.activation_checkpointing=false",
            "train.progress_bar=false",
            "train.checkpoint_every=0",
            *extra,
        ]

    return make
