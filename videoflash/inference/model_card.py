"""The model card (README.md) of an export: metadata for the hub, usage with ``trust_remote_code``
and a pinned revision, the frame policy, the training recipe, stage, data mix and measured results
of the run -- and, where the run directory does not hold something, a sentence saying so."""

from __future__ import annotations

import os
import re
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .run_info import RunInfo

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_model_of(info: RunInfo) -> str | None:
    """The LLM's hub id when the run started from one (a local path is not a hub id)."""
    cfg = info.stage_config or {}
    text = ((cfg.get("model") or {}).get("text") or {}).get("pretrained")
    if isinstance(text, str) and HUB_ID.match(text) and not os.path.exists(text):
        return text
    return None


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _is_benchmark(numbers: dict[str, float]) -> bool:
    """Numbers of an offline-runner result (``videoflash.eval.runner``): overall and per category."""
    return "accuracy" in numbers and "total" in numbers and any(k.startswith("categories/") for k in numbers)


def render_card(info: RunInfo, *, name: str, config, processor, num_params: int, files: dict[str, Any],
                repo_id: str | None = None, extra_tags: list[str] | None = None) -> ModelCard:
    """Build the card. ``config`` is the exported ``VideoFlashConfig``, ``processor`` the exported
    ``VideoFlashProcessor``; ``files`` notes the export's layout (shards, dtype)."""
    base = base_model_of(info)
    tags = ["video-text-to-text", "videoflash", "videochat-flash", "long-video", "custom_code"]
    tags += list(extra_tags or [])
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="video-text-to-text",
        tags=tags,
        base_model=base,
        license="apache-2.0",
    )
    tc = config.text_config
    vc = config.vision_config
    repo = repo_id or "<user>/<repo>"
    stage_cfg = (info.stage_config or {}).get("stage") or {}
    model_cfg = (info.stage_config or {}).get("model") or {}
    data_cfg = (info.stage_config or {}).get("data") or {}
    L: list[str] = []
    add = L.append
    add(f"# {name}\n")
    add(
        "A long-video language model in the VideoChat-Flash style, trained with "
        "videoflash: a UMT clip encoder whose tokens are merged without "
        f"parameters to {config.tokens_per_frame} per frame, a Linear-GELU-Linear connector and a "
        f"{tc.model_type} LLM that can drop visual tokens progressively inside its layers.\n"
    )
    if info.source.stage_id is not None:
        stage_name = stage_cfg.get("name")
        add(f"This checkpoint is the end of **stage {info.source.stage_id}"
            f"{f' ({stage_name})' if stage_name else ''}** of the training curriculum.\n")
    add("## Model\n")
    add("| part | value |\n|---|---|")
    add(f"| parameters | {_count(num_params)} ({files.get('dtype', '?')}) |")
    add(f"| vision encoder | UMT, width {vc['width']}, {vc['depth']} blocks, {vc['patch_size']}px patches, "
        f"{vc['image_size']}px frames, clips of {vc['frames_per_clip']} frames |")
    add(f"| visual tokens | {config.tokens_per_clip} per clip ({config.tokens_per_frame} per frame), "
        f"{config.tokens_per_image} per image tile (grids up to {config.max_grid}x{config.max_grid}) |")
    add(f"| LLM | {tc.model_type}, hidden {tc.hidden_size}, {tc.num_hidden_layers} layers, "
        f"{tc.num_attention_heads} heads ({getattr(tc, 'num_key_value_heads', '?')} KV), vocabulary {tc.vocab_size} |")
    rope = dict(getattr(tc, "rope_parameters", None) or {})
    add(f"| context | {tc.max_position_embeddings} positions (RoPE {_fmt(rope)}) |")
    if config.visual_dropout_in_inference and config.visual_dropout_layers:
        add(f"| visual dropout at inference | after layers {config.visual_dropout_layers}: keep "
            f"{config.visual_dropout_keep_ratios} ({config.visual_dropout_kinds}) |")
    else:
        add("| visual dropout at inference | off (opt in with `visual_dropout=\"published\"`) |")
    if base:
        add(f"| base LLM | [{base}](https://huggingface.co/{base}) |")
    elif model_cfg.get("text", {}).get("pretrained"):
        add(f"| base LLM | `{model_cfg['text']['pretrained']}` (local path at training time) |")
    if model_cfg.get("vision", {}).get("pretrained"):
        add(f"| vision weights | `{model_cfg['vision']['pretrained']}` |")
    add(f"| files | {files.get('shards', '?')} safetensors shard(s), max {files.get('max_shard_size', '?')} each |")
    add("")

    add("## Usage\n")
    add("The model's code ships with the weights, so loading needs `trust_remote_code=True`. Pin the "
        "revision you reviewed: remote code runs on your machine.\n")
    add("Requirements: `torch`, `transformers>=5`, `timm`, `decord2` (or `decord`).\n")
    add("```python\nimport torch\nfrom transformers import AutoModel, AutoProcessor\n")
    add(f'repo = "{repo}"\nrevision = "<commit sha>"  # pin the commit you reviewed')
    add("model = AutoModel.from_pretrained(repo, trust_remote_code=True, revision=revision, dtype=torch.bfloat16).eval()")
    add("processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True, revision=revision)\n")
    add('answer, history = model.chat("video.mp4", "Describe the video in detail.", processor=processor,')
    add(f"                             max_frames={processor.max_frames}, return_history=True)")
    add('follow_up = model.chat("video.mp4", "What happens at the end?", processor=processor, history=history)\n')
    add("# or the plain HF way: processor -> generate")
    add('inputs = processor(text="What is shown?", videos="video.mp4").to(model.device)')
    add("out = model.generate(**inputs, max_new_tokens=128)")
    add('print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n```\n')
    add("From a clone of videoflash: `python -m videoflash.chat --model <dir> --video video.mp4 \"question\"` "
        "(tokens stream as they are generated; `-i` keeps the conversation going).\n")

    add("### Frames and prompt\n")
    add("| setting | value |\n|---|---|")
    add(f"| frame policy | `{processor.frame_policy}`, {processor.min_frames}..{processor.max_frames} frames, "
        f"multiples of {processor.frames_per_clip} |")
    add(f"| frame size | {processor.image_size}x{processor.image_size} (square resize, no crop) |")
    add(f"| normalisation | mean {processor.image_mean}, std {processor.image_std} (on the device) |")
    add(f"| images | `{processor.image_mode}` |")
    add("| prompt | ChatML; first user turn `<image>\\nThe video lasts for X seconds, and N frames are "
        "uniformly sampled from it. {question}` |")
    add("")

    add("### Long videos\n")
    add("- `model.chat` decodes and encodes frames in bounded batches (`decode_batch_frames`, "
        "`max_clips_per_batch`), so memory grows with the visual tokens kept, not with the frames decoded.")
    add(f"- Beyond {tc.max_position_embeddings} positions, enable YaRN: `model.enable_yarn(4.0)` "
        "(or `--yarn 4` in the CLI).")
    add("- Progressive visual dropout at inference (VideoChat-Flash's setting: after layer 4 keep 75% "
        "uniformly, after layer 18 keep 25% by text attention): `model.chat(..., visual_dropout=\"published\")`.\n")

    add("## Training\n")
    if info.stages:
        add("| stage | name | trains | lr (vision lr) | global batch | frames | max tokens | image size | steps | final loss |")
        add("|---|---|---|---|---|---|---|---|---|---|")
        for s in info.stages:
            mark = " (this checkpoint)" if s["id"] == info.source.stage_id else ""
            frames = s.get("frames") or {}
            frames_txt = (f"{frames.get('sampling')} {frames.get('min_frames')}..{frames.get('max_frames')}"
                          if frames else "–")
            add(f"| {s['id']}{mark} | {_fmt(s.get('name'))} | {_fmt(s.get('trainable'))} | {_fmt(s.get('lr'))} "
                f"({_fmt(s.get('vision_lr'))}) | {_fmt(s.get('global_batch_size'))} | {frames_txt} | "
                f"{_fmt(s.get('max_tokens'))} | {_fmt(s.get('image_size'))} | {_fmt(s.get('steps'))} | "
                f"{_fmt(s.get('final_loss'))} |")
        add("")
    if stage_cfg:
        add(f"### Recipe of stage {info.source.stage_id}\n")
        add("| field | value |\n|---|---|")
        for key in ("name", "trainable", "lr", "vision_lr", "connector_lr", "weight_decay", "lr_schedule",
                    "warmup_ratio", "min_lr_ratio", "global_batch_size", "micro_batch_size", "epochs", "max_steps",
                    "frames", "max_tokens", "image_size", "image_mode", "prompt_format", "init", "adapter"):
            if key in stage_cfg:
                add(f"| {key} | {_fmt(stage_cfg[key])} |")
        ds = (info.stage_config or {}).get("deepspeed") or {}
        if ds:
            add(f"| deepspeed | ZeRO-{ds.get('zero_stage', '?')} (offload optimizer: {ds.get('offload_optimizer', 'none')}, "
                f"params: {ds.get('offload_param', 'none')}) |")
        add("")
    add("### Data mix\n")
    sources = data_cfg.get("sources") or []
    if sources:
        total = sum(float(s.get("weight", 1.0)) for s in sources) or 1.0
        add(f"Mix `{data_cfg.get('name', '?')}`:\n")
        add("| source | shards | weight | share |\n|---|---|---|---|")
        for s in sources:
            w = float(s.get("weight", 1.0))
            add(f"| {s.get('name')} | `{s.get('shards')}` | {w:g} | {w / total:.1%} |")
        if data_cfg.get("num_samples"):
            add(f"\nSamples per epoch: {data_cfg['num_samples']}.")
        add("")
    else:
        add("The data mix is not recorded in the run directory.\n")

    add("## Results\n")
    m = info.metrics
    if m and m.get("steps"):
        add(f"Training (stage {info.source.stage_id}): {m['steps']} steps, {m.get('samples', 0)} samples, "
            f"{_count(int(m.get('tokens', 0)))} tokens ({_count(int(m.get('visual_tokens', 0)))} visual); loss "
            f"{_fmt(m.get('first_loss'))} -> {_fmt(m.get('final_loss'))} (mean of the last 10 steps "
            f"{_fmt(m.get('final_loss_mean10'))}); {m.get('train_seconds', 0):.0f} s of training"
            + (f", {m['tokens_per_s']:.0f} tokens/s" if m.get("tokens_per_s") else "")
            + (f", MFU {m['mfu_mean']:.1%}" if m.get("mfu_mean") else "") + ".\n")
    bench_rows = [(f, n) for f, n in info.eval_results if _is_benchmark(n)]
    if bench_rows:
        add("Benchmarks (`python -m videoflash.eval bench=...`, accuracy in %):\n")
        add("| file | questions | accuracy |\n|---|---|---|")
        for fname, numbers in bench_rows:
            add(f"| `{fname}` | {int(numbers['total'])} | {100 * numbers['accuracy']:.1f} |")
        add("")
    for fname, numbers in info.eval_results:
        if _is_benchmark(numbers):
            add(f"Per category, `{fname}`:\n")
            add("| axis | category | questions | accuracy (%) |\n|---|---|---|---|")
            for key, value in numbers.items():
                parts = key.split("/")
                if len(parts) == 4 and parts[0] == "categories" and parts[3] == "accuracy":
                    total = numbers.get("/".join(parts[:3] + ["total"]), 0)
                    add(f"| {parts[1]} | {parts[2]} | {int(total)} | {100 * value:.1f} |")
            add("")
            continue
        add(f"Evaluation `{fname}`:\n")
        add("| metric | value |\n|---|---|")
        for key, value in list(numbers.items())[:60]:
            add(f"| {key} | {_fmt(value)} |")
        if len(numbers) > 60:
            add(f"| ... | {len(numbers) - 60} more in the file |")
        add("")
    if info.missing:
        add("**Not available from the run directory:**\n")
        for note in info.missing:
            add(f"- {note}")
        add("")

    add("## Provenance\n")
    add(f"- exported from `{info.source.checkpoint}`" + (f" (run `{info.source.run_root}`)" if info.source.run_root else ""))
    if info.training_state:
        st = info.training_state
        add(f"- training state: step {st.get('step', '?')}, completed {st.get('completed', '?')}, "
            f"started from `{st.get('init', '?')}`")
    add(f"- exported with videoflash {files.get('videoflash_version', '?')} on {files.get('date', '?')}")
    add("")
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(L)
    return ModelCard(content)
