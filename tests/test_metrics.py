"""What a training step reports, on a worked example: two micro-batches of known tokens and FLOPs on
a 4-device run of known peak, numbers done by hand below."""

from __future__ import annotations

import json

import pytest
import torch

from videoflash.train.metrics import Reporter, StepStats


def test_step_record_per_device_rates_and_both_mfus(tmp_path):
    stats = StepStats()
    batch = {"input_ids": torch.zeros(1, 10, dtype=torch.long), "attention_mask": torch.ones(1, 10),
             "num_text_tokens": torch.tensor([10]), "num_visual_tokens": torch.tensor([32])}
    parts = {"vision": 3e12, "connector": 1e12, "llm": 6e12, "total": 10e12}
    stats.add(2.0, batch, parts)
    stats.add(1.0, batch, parts)
    total = stats.reduce(torch.device("cpu"))  # no process group: the values themselves
    reporter = Reporter(stage_dir=tmp_path, total_steps=10, start_step=0, world_size=4, peak_tflops=100.0,
                        enabled=True, progress_bar=False)
    rec = reporter.step(1, total, seconds=2.0, lr={"llm": 1e-5}, extra={})
    reporter.close()
    # 2 x (10 text + 32 visual) tokens in 2 s over 4 devices
    assert rec["tokens"] == 84 and rec["tokens_per_s"] == pytest.approx(42.0)
    assert rec["tokens_per_s_per_device"] == pytest.approx(10.5)
    # 20 TFLOP in 2 s over 4 devices = 2.5 TFLOP/s each, of which vision + connector 8 TFLOP -> 1.0
    assert rec["tflops_per_s_per_device"] == pytest.approx(2.5)
    assert rec["vision_tflops_per_s_per_device"] == pytest.approx(1.0)
    assert rec["vision_flops_share"] == pytest.approx(0.4)
    # MFU against a 100 TFLOP/s peak: everything 2.5%, the LLM alone (1.5 TFLOP/s) 1.5%
    assert rec["mfu"] == pytest.approx(0.025) and rec["mfu_llm"] == pytest.approx(0.015)
    assert rec["loss"] == pytest.approx(1.5)
    written = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert written["mfu_llm"] == pytest.approx(0.015) and written["tokens_per_s_per_device"] == pytest.approx(10.5)


def test_cpu_run_has_no_mfu_and_a_plain_total_still_counts(tmp_path):
    stats = StepStats()
    stats.add(1.0, {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5)}, 4e9)
    reporter = Reporter(stage_dir=tmp_path, total_steps=1, start_step=0, world_size=1, peak_tflops=None,
                        enabled=True, progress_bar=False)
    rec = reporter.step(1, stats.reduce(torch.device("cpu")), seconds=0.5, lr={}, extra={})
    reporter.close()
    assert "mfu" not in rec and "mfu_llm" not in rec  # no peak known (CPU): no made-up utilisation
    assert rec["tflops_per_s_per_device"] == pytest.approx(0.008) and rec["vision_flops_share"] == 0.0
    assert rec["tokens_per_s_per_device"] == pytest.approx(20.0)
