"""Stage hand-off: stage N starts from what stage N-1 exported, and users load the export.

Single process (bare ``python -m videoflash.train``), real DeepSpeed ZeRO-3 on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def train(args, env, timeout=400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "videoflash.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_stage_without_its_predecessor_fails_fast_and_says_why(tmp_path, tiny_overrides, ds_env):
    res = train(["stage=3", *tiny_overrides(tmp_path / "run")], ds_env)
    assert res.returncode != 0
    message = res.stdout + res.stderr
    assert str(tmp_path / "run" / "stage2" / "export") in message and "stage=2" in message
    assert not (tmp_path / "run" / "stage3" / "checkpoints").exists()


def test_stage_two_starts_from_stage_one_export(tmp_path, tiny_overrides, ds_env):
    run = tmp_path / "run"
    res = train(["stage=1", *tiny_overrides(run, steps=2)], ds_env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    s1 = run / "stage1" / "export"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "training_state.json"):
        assert (s1 / name).is_file(), name
    w1 = load_file(str(s1 / "model.safetensors"))
    assert {v.dtype for v in w1.values() if v.is_floating_point()} == {torch.bfloat16}  # a 16-bit export

    # stage 2 trains only the connector here, so its export must carry stage 1's encoder and LLM unchanged
    res = train(["stage=2", "stage.trainable=[connector]", "stage.lr=1e-2", *tiny_overrides(run, steps=2)], ds_env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    s2 = run / "stage2" / "export"
    w2 = load_file(str(s2 / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for name in w1:
        same = torch.equal(w1[name], w2[name])
        assert same == (not name.startswith("connector.")), name
    assert json.loads((s2 / "training_state.json").read_text())["init"] == str(s1)

    # resume=auto on a finished stage does nothing and keeps the export
    stamp = (s2 / "model.safetensors").stat().st_mtime_ns
    res = train(["stage=2", *tiny_overrides(run, steps=2)], ds_env)
    assert res.returncode == 0 and "already finished" in res.stdout
    assert (s2 / "model.safetensors").stat().st_mtime_ns == stamp


def test_users_load_the_export_with_from_pretrained(tmp_path, tiny_overrides, ds_env):
    run = tmp_path / "run"
    res = train(["stage=1", "logger=wandb", *tiny_overrides(run, steps=1)], ds_env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    export = run / "stage1" / "export"
    # wandb (offline here) got a run whose log holds the resolved config
    logs = list((run / "stage1" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    assert str(run).encode() in logs[0].read_bytes()  # run_root, as resolved
    code = f"""
import torch
from transformers import AutoTokenizer
from videoflash.model.modeling_videoflash import VideoFlashForConditionalGeneration
model = VideoFlashForConditionalGeneration.from_pretrained({str(export)!r})
tok = AutoTokenizer.from_pretrained({str(export)!r})
ids = tok.apply_chat_template([{{"role": "user", "content": "<image>\\nWhat color is the shape?"}}],
                              add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
frames = torch.randint(0, 255, (4, 64, 64, 3), dtype=torch.uint8)
out = model.generate(input_ids=ids, pixel_values_videos=frames, video_frame_counts=torch.tensor([4]), max_new_tokens=3,
                     do_sample=False)
assert out.shape[1] > ids.shape[1]
print("OK", model.config.image_token_id == tok.convert_tokens_to_ids("<image>"))
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ds_env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK True" in res.stdout
