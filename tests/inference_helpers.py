"""Shared pieces of the inference tests (export, processor, chat, long video): real H.264 mp4 files
written with PyAV whose frames carry their own index, a tiny VideoFlash over the small ChatML
tokenizer, and a training run directory laid out as the trainer writes it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tests.tiny_model import tiny_config

from videoflash.data.tokenizer import build_chatml_tokenizer
from videoflash.model.configuration_videoflash import VideoFlashConfig
from videoflash.model.modeling_videoflash import VideoFlashForConditionalGeneration

def model_package_files() -> list[Path]:
    """The files an export copies: every .py of videoflash/model."""
    import videoflash.model

    return sorted(Path(videoflash.model.__file__).parent.glob("*.py"))


# -- videos whose frames say which frame they are ------------------------------------------------------


def frame_color(i: int) -> tuple[int, int, int]:
    """A flat colour per frame index (modulo 256): steps of 16 levels survive H.264 and scaling."""
    i %= 256
    return 16 * (i % 16) + 8, 16 * (i // 16) + 8, 128


def frame_id(frame) -> int:
    """The index (modulo 256) a decoded flat frame carries (see :func:`frame_color`)."""
    f = torch.as_tensor(frame).float()
    r, g = f[..., 0].mean().item(), f[..., 1].mean().item()
    return int(round((r - 8) / 16)) + 16 * int(round((g - 8) / 16))


def write_mp4(path, num_frames: int, fps: float = 4.0, width: int = 80, height: int = 48) -> Path:
    """A real H.264 (yuv420p) mp4 of ``num_frames`` flat frames, frame ``i`` coloured ``frame_color(i)``."""
    import av

    path = Path(path)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(fps) if float(fps).is_integer() else fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "10"}
        for i in range(num_frames):
            arr = np.empty((height, width, 3), np.uint8)
            arr[...] = frame_color(i)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# -- a tiny model with a real tokenizer --------------------------------------------------------------------


def tiny_tokenizer():
    return build_chatml_tokenizer()


def tiny_chat_config(tokenizer, layers: int = 4, hidden: int = 64, **overrides) -> VideoFlashConfig:
    """The tiny test model of tests/tiny_model.py over the tokenizer's vocabulary, with ``layers``
    layers of width ``hidden`` and tiles of at most 2x2."""
    text = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                vocab_size=len(tokenizer), tie_word_embeddings=False)
    text.update(overrides.pop("text", {}))
    kwargs = dict(text=text, max_grid=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    kwargs.update(overrides)
    return tiny_config(**kwargs)


def tiny_chat_model(tokenizer, seed: int = 0, **overrides) -> VideoFlashForConditionalGeneration:
    torch.manual_seed(seed)
    model = VideoFlashForConditionalGeneration(tiny_chat_config(tokenizer, **overrides)).eval()
    # a randomly initialised LM head is nearly flat; sharpen it so greedy answers are not ties
    with torch.no_grad():
        model.language_model.lm_head.weight.mul_(8.0)
    return model


def collecting_streamer():
    """A ``generate`` streamer that records what it is given: the prompt's ids first, then one list
    of ids per step, then ``"end"``."""
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.chunks.append("end")

    return Collect()


# -- a training run directory ------------------------------------------------------------------------------

STAGE3_CONFIG = """\
name: tinyrun
run_root: {run_root}
seed: 1234
resume: auto
model:
  name: tiny
  image_size: 64
  tokens_per_clip: 16
  tokens_per_image: 16
  max_grid: 2
  vision: {{width: 64, depth: 2, num_heads: 4, pretrained: null}}
  text: {{pretrained: Qwen/Qwen2-0.5B-Instruct, model_type: qwen2, hidden_size: 64}}
data:
  name: synthetic
  root: data/synthetic
  sources:
    - {{name: synthetic_short, shards: 'data/short-{{000000..000003}}.tar', weight: 3.0}}
    - {{name: synthetic_long, shards: 'data/long-{{000000..000001}}.tar', weight: 1.0}}
stage:
  id: 3
  name: long_sft
  trainable: [vision_tower, connector, language_model]
  lr: 1.0e-05
  vision_lr: 2.0e-06
  global_batch_size: 8
  micro_batch_size: 1
  epochs: 1.0
  lr_schedule: cosine
  warmup_ratio: 0.03
  frames: {{sampling: dynamic_fps1, min_frames: 8, max_frames: 24}}
  max_tokens: 2048
  image_size: 64
  image_mode: anyres
deepspeed: {{zero_stage: 3, offload_optimizer: none, offload_param: none}}
"""


def write_stage_export(model, tokenizer, export_dir: Path, step: int) -> Path:
    """What ``videoflash/train/export.py`` writes at a stage's end."""
    export_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(export_dir)
    tokenizer.save_pretrained(export_dir)
    (export_dir / "training_state.json").write_text(json.dumps({"stage": 3, "step": step, "completed": True,
                                                                 "init": "runs/tinyrun/stage2/export"}))
    return export_dir


def make_run_dir(root: Path, model, tokenizer) -> Path:
    """A run root with stage 1 (an older export, no config) and stage 3 (export, config.yaml,
    metrics.jsonl with a resumed step, an evaluation file)."""
    run = Path(root) / "tinyrun"
    write_stage_export(model, tokenizer, run / "stage1" / "export", step=2)
    stage3 = run / "stage3"
    write_stage_export(model, tokenizer, stage3 / "export", step=4)
    (stage3 / "config.yaml").write_text(STAGE3_CONFIG.format(run_root=run))
    records = [
        {"step": 1, "loss": 6.5, "samples": 8, "tokens": 4000, "visual_tokens": 3000, "s_per_step": 2.0},
        {"step": 2, "loss": 5.9, "samples": 8, "tokens": 4100, "visual_tokens": 3100, "s_per_step": 2.0},
        {"event": "checkpoint", "step": 2, "time": 0},
        {"step": 2, "loss": 5.8, "samples": 8, "tokens": 4100, "visual_tokens": 3100, "s_per_step": 2.0},  # resumed
        {"step": 3, "loss": 5.1, "samples": 8, "tokens": 3900, "visual_tokens": 2900, "s_per_step": 2.0},
        {"step": 4, "loss": 4.25, "samples": 8, "tokens": 4000, "visual_tokens": 3000, "s_per_step": 2.0},
        {"event": "export", "step": 4, "time": 0},
    ]
    (stage3 / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (stage3 / "eval_heldout.json").write_text(json.dumps({"heldout": {"accuracy": 0.8125, "num_samples": 48},
                                                          "predictions": [{"id": 7, "correct": True}]}))
    (run / "quickstart.json").write_text(json.dumps([{"stage": 1, "loss": 6.1, "accuracy": 0.25},
                                                     {"stage": 3, "loss": 4.3, "accuracy": 0.8125}]))
    return run
