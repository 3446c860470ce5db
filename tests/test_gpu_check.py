"""scripts/gpu_check.py, the GPU machine's checks, runs its own code on CPU with --tiny (gloo, fp32).

The real run happens only where a GPU is lent; this keeps the script from rotting in between: the
attention kernels available on CPU agree with the float32 math backend, so do the kernels of packed
rows (the block-diagonal mask, FlexAttention's document mask) with SDPA sample by sample, and
ZeRO-3 steps on the
synthetic batch lower the loss."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_runs_on_cpu(tmp_path, ds_env):
    out = tmp_path / "checks.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29731",
           str(ROOT / "scripts" / "gpu_check.py"), "--tiny", "--steps", "4", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=ds_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    attention = [r for r in rows if r["check"] == "attention" and "max_abs_err" in r]
    assert {r["kernel"] for r in attention} >= {"sdpa_math"}
    assert all(r["max_abs_err"] < 1e-5 for r in attention)
    packed = {r["kernel"]: r for r in rows if r["check"] == "packed"}
    assert {"sdpa_per_sample", "sdpa_block_diagonal", "flex_document_eager"} <= set(packed)
    assert all(packed[k]["max_abs_err"] < 1e-5 for k in ("sdpa_per_sample", "sdpa_block_diagonal", "flex_document_eager"))
    assert packed["sdpa_block_diagonal"]["max_abs_grad_err"] < 1e-4
    assert packed["chosen"]["packed_varlen_uses"] == "sdpa_per_sample"
    (train,) = [r for r in rows if r["check"] == "train"]
    assert train["zero_stage"] == 3 and train["tokens"] == 32 - 1 + 8 // 4 * 4
    assert train["losses"][-1] < train["losses"][0]
    # one packed row of 3 samples (8 frames -> 2 clips x 4 tokens, 16 text tokens each) per step
    (packed_train,) = [r for r in rows if r["check"] == "train_packed"]
    assert packed_train["attn"] == "packed_varlen" and packed_train["samples"] == 3
    assert packed_train["tokens"] == 3 * (16 - 1 + 8 // 4 * 4)
    assert packed_train["losses"][-1] < packed_train["losses"][0]
