"""Inference helpers of VideoFlash: bounded-memory video encoding, YaRN, inference-time visual dropout
and ``chat``. The model class exposes them as thin methods (``encode_video_chunked``,
``enable_yarn``, ``disable_yarn``, ``chat``).

- **Long videos, bounded memory.** :func:`encode_video_chunked` runs the encoder under ``no_grad``
  on at most ``max_clips_per_batch`` clips at a time and writes only the merged, projected tokens
  (``tokens_per_clip`` per clip) into one preallocated tensor; fed by
  ``VideoFlashProcessor.iter_video_batches``, frames are decoded batch by batch too, so memory grows
  with the visual tokens kept, not with the frames decoded. The tokens go to ``generate`` /
  ``forward`` as ``video_embeds``.
- **YaRN.** :func:`enable_yarn` switches the LLM's RoPE to YaRN (``rope_type="yarn"``, ``factor``,
  ``original_max_position_embeddings``: transformers' ``rope_parameters`` format) and rebuilds the
  rotary embedding, for contexts beyond the LLM's native length (Qwen2: 32k tokens, about 2,000
  frames at 16 tokens per frame).
- **Visual dropout at inference.** :data:`PUBLISHED_DROPOUT` is the published opt-in setting (after
  layer 4 keep 75% of the visual tokens uniformly, after layer 18 keep the 25% the last prompt token
  attends to most); :func:`visual_dropout` applies a schedule for the duration of a call.

This file is copied into every exported checkpoint; it imports only torch, transformers, the standard
library and its siblings.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import warnings

import torch

__all__ = [
    "PUBLISHED_DROPOUT",
    "parse_dropout",
    "visual_dropout",
    "encode_video_chunked",
    "yarn_rope_parameters",
    "enable_yarn",
    "disable_yarn",
    "load_processor",
    "chat",
]

#: ``generate`` arguments the chunked-prefill decoder understands (kv_compression)
_COMPRESSED_GENERATE_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id")

#: VideoChat-Flash's recommended opt-in for long inputs (HF card): ``llm_compress_layer_list=[4, 18]``,
#: ``llm_image_token_ratio_list=[1, 0.75, 0.25]``, ``uniform0_attention``.
PUBLISHED_DROPOUT = {"layers": [4, 18], "keep_ratios": [0.75, 0.25], "kinds": ["uniform", "text"]}

_NO_DROPOUT = ("none", "off", "false", "no", "0")


def parse_dropout(spec):
    """A dropout schedule from a user spec, as ``(layers, keep_ratios, kinds)`` or None (no dropout).

    Accepted: ``"published"`` (:data:`PUBLISHED_DROPOUT`), ``"none"`` / ``"off"``, a string of
    ``layer:ratio:kind`` entries separated by commas (``"4:0.75:uniform,18:0.25:text"``), a dict with
    ``layers``, ``keep_ratios`` and ``kinds``, or a list of ``(layer, ratio, kind)``.
    """
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in _NO_DROPOUT:
            return None
        if text == "published":
            spec = PUBLISHED_DROPOUT
        else:
            entries = []
            for part in text.split(","):
                fields = part.strip().split(":")
                if len(fields) != 3:
                    raise ValueError(f"visual dropout entry {part!r}: expected layer:ratio:kind, e.g. 4:0.75:uniform")
                entries.append((int(fields[0]), float(fields[1]), fields[2]))
            spec = entries
    if isinstance(spec, dict):
        return [int(x) for x in spec["layers"]], [float(x) for x in spec["keep_ratios"]], list(spec["kinds"])
    if isinstance(spec, (list, tuple)):
        entries = list(spec)
        return [int(e[0]) for e in entries], [float(e[1]) for e in entries], [str(e[2]) for e in entries]
    raise ValueError(f"cannot read a visual dropout schedule from {spec!r}")


@contextlib.contextmanager
def visual_dropout(config, spec):
    """Within the block, the model drops visual tokens at inference by ``spec`` (see
    :func:`parse_dropout`; ``None`` leaves the config as it is); the config is restored afterwards."""
    if spec is None:
        yield config
        return
    saved = (
        list(config.visual_dropout_layers),
        list(config.visual_dropout_keep_ratios),
        list(config.visual_dropout_kinds),
        config.visual_dropout_position,
        config.visual_dropout_in_inference,
    )
    try:
        schedule = parse_dropout(spec)
        if schedule is None:
            config.visual_dropout_in_inference = False
        else:
            layers, ratios, kinds = schedule
            try:
                config.set_visual_dropout(layers, ratios, kinds, position=config.visual_dropout_position, inference=True)
            except ValueError as exn:
                raise ValueError(
                    f"visual dropout {spec!r} does not fit this model "
                    f"({config.text_config.num_hidden_layers} LLM layers): {exn}"
                ) from exn
        yield config
    finally:
        config.visual_dropout_layers, config.visual_dropout_keep_ratios, config.visual_dropout_kinds = (
            saved[0], saved[1], saved[2])
        config.visual_dropout_position, config.visual_dropout_in_inference = saved[3], saved[4]


# --------------------------------------------------------------------------------------------------
# bounded-memory encoding
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_video_chunked(model, frames, max_clips_per_batch: int = 16, total_frames: int | None = None) -> torch.Tensor:
    """Visual tokens of a video, encoding at most ``max_clips_per_batch`` clips at a time.

    Args:
        model: a ``VideoFlashForConditionalGeneration``.
        frames: uint8 ``[N, H, W, 3]``, or an iterable of such batches (each a multiple of the clip
            length), e.g. ``processor.iter_video_batches(...)`` so frames are decoded batch by batch.
        max_clips_per_batch: clips per encoder call (memory of the encoder ~ this many clips).
        total_frames: frames the iterable yields in all; when given, the output is allocated once.

    Returns:
        ``[N / frames_per_clip * tokens_per_clip, hidden]`` on the model's device, the same tokens as
        ``model.encode_video(frames)`` in one call (clips are encoded independently).
    """
    t = model.config.frames_per_clip
    per_clip = model.config.tokens_per_clip
    step = max(1, int(max_clips_per_batch)) * t
    if isinstance(frames, torch.Tensor):
        total_frames = int(frames.shape[0])
        batches = (frames,)
    else:
        batches = frames
    device = model.vision_tower.patch_embed.proj.weight.device
    out = None
    pieces = []
    pos = 0
    for batch in batches:
        batch = torch.as_tensor(batch)
        if batch.shape[0] % t:
            raise ValueError(f"every batch of frames must hold whole clips of {t} frames, got {batch.shape[0]}")
        for sub in batch.split(step):
            tokens = model.encode_video(sub.to(device, non_blocking=True))
            if total_frames is not None:
                if out is None:
                    if total_frames % t:
                        raise ValueError(f"a video needs a multiple of {t} frames, got {total_frames}")
                    out = tokens.new_empty(total_frames // t * per_clip, tokens.shape[-1])
                if pos + tokens.shape[0] > out.shape[0]:
                    raise ValueError(f"the batches hold more than total_frames={total_frames} frames")
                out[pos : pos + tokens.shape[0]] = tokens
            else:
                pieces.append(tokens)
            pos += tokens.shape[0]
            del tokens
    if total_frames is None:
        if not pieces:
            raise ValueError("no frames to encode")
        return torch.cat(pieces)
    if out is None or pos != out.shape[0]:
        raise ValueError(f"the batches held {pos // per_clip * t} frames, not total_frames={total_frames}")
    return out


# --------------------------------------------------------------------------------------------------
# YaRN
# --------------------------------------------------------------------------------------------------


def yarn_rope_parameters(text_config, factor: float, original_max_position_embeddings: int | None = None,
                         beta_fast: float | None = None, beta_slow: float | None = None) -> dict:
    """The ``rope_parameters`` dict of YaRN for ``text_config`` (transformers 5 format)."""
    factor = float(factor)
    if not factor >= 1.0:
        raise ValueError(f"the YaRN factor must be >= 1, got {factor}")
    current = dict(getattr(text_config, "rope_parameters", None) or {})
    theta = current.get("rope_theta", getattr(text_config, "rope_theta", None))
    if theta is None:
        raise ValueError("the text config has no rope_theta")
    original = original_max_position_embeddings
    if original is None:
        original = current.get("original_max_position_embeddings") if current.get("rope_type") == "yarn" else None
    if original is None:
        original = text_config.max_position_embeddings
    params = {
        "rope_type": "yarn",
        "rope_theta": float(theta),
        "factor": factor,
        "original_max_position_embeddings": int(original),
    }
    if beta_fast is not None:
        params["beta_fast"] = float(beta_fast)
    if beta_slow is not None:
        params["beta_slow"] = float(beta_slow)
    return params


def _rebuild_rotary(model) -> None:
    decoder = model.get_decoder()
    old = decoder.rotary_emb
    device = old.inv_freq.device
    decoder.rotary_emb = type(old)(config=model.language_model.config).to(device)


def enable_yarn(model, factor: float, original_max_position_embeddings: int | None = None,
                beta_fast: float | None = None, beta_slow: float | None = None) -> dict:
    """Switch the LLM's RoPE to YaRN scaled by ``factor`` over ``original_max_position_embeddings``
    (default: the current native length); ``max_position_embeddings`` becomes ``original * factor``.
    Returns the new ``rope_parameters``; the config saved by ``save_pretrained`` keeps them."""
    text_config = model.config.text_config
    params = yarn_rope_parameters(text_config, factor, original_max_position_embeddings, beta_fast, beta_slow)
    for cfg in {id(text_config): text_config, id(model.language_model.config): model.language_model.config}.values():
        cfg.rope_parameters = dict(params)
        cfg.max_position_embeddings = int(round(params["original_max_position_embeddings"] * params["factor"]))
        cfg.validate_rope()
    _rebuild_rotary(model)
    return params


def disable_yarn(model) -> None:
    """Back to plain RoPE at the native length recorded by :func:`enable_yarn`."""
    text_config = model.config.text_config
    current = dict(text_config.rope_parameters or {})
    if current.get("rope_type") != "yarn":
        return
    for cfg in {id(text_config): text_config, id(model.language_model.config): model.language_model.config}.values():
        cfg.max_position_embeddings = int(current["original_max_position_embeddings"])
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": current["rope_theta"]}
    _rebuild_rotary(model)


# --------------------------------------------------------------------------------------------------
# chat
# --------------------------------------------------------------------------------------------------


def load_processor(model):
    """The processor saved beside the model (``processor_config.json``), or one built from the
    tokenizer and the model config (a training export has no processor file); cached on the model."""
    proc = getattr(model, "_videoflash_processor", None)
    if proc is not None:
        return proc
    from .processing_videoflash import VideoFlashProcessor

    path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not path or not os.path.isdir(path):
        raise ValueError(
            "chat() needs a processor: pass processor=..., or load the model from a local directory "
            "that holds the tokenizer (and processor_config.json)"
        )
    proc = VideoFlashProcessor.from_directory(path, config=model.config)
    model._videoflash_processor = proc
    return proc


def _video_key(video, processor, sampling) -> tuple | None:
    """A cache key for the visual tokens of ``video`` (files and bytes; decoded arrays are not cached)."""
    policy = (processor.frame_policy, processor.min_frames, processor.max_frames, processor.image_size, sampling)
    if isinstance(video, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(video))
        st = os.stat(path)
        return ("file", path, st.st_size, st.st_mtime_ns, policy)
    if isinstance(video, (bytes, bytearray, memoryview)):
        return ("bytes", hashlib.sha1(bytes(video)).hexdigest(), policy)
    return None


def _visual_inputs(model, processor, video, images, sampling, max_clips_per_batch, decode_batch_frames):
    """``generate`` kwargs of the visual input and the time message."""
    if video is not None:
        key = _video_key(video, processor, sampling)
        cached = getattr(model, "_videoflash_visual_cache", None)
        if key is not None and cached is not None and cached[0] == key:
            _, embeds, meta = cached
        else:
            model._videoflash_visual_cache = None  # free the previous video's tokens first
            source = processor.open_video(video, fps=sampling.get("fps"))
            try:
                meta = processor.sample(source, sampling.get("max_frames"), sampling.get("min_frames"),
                                        sampling.get("start"), sampling.get("end"))
                batches = processor.iter_video_batches(source, meta, decode_batch_frames)
                embeds = encode_video_chunked(model, batches, max_clips_per_batch, total_frames=meta.num_sampled)
            finally:
                source.close()
            model._videoflash_visual_cache = (key, embeds, meta) if key is not None else None
        counts = torch.tensor([meta.num_sampled], dtype=torch.long)
        return {"video_embeds": embeds, "video_frame_counts": counts}, meta.time_message, embeds.shape[0]
    if images is not None:
        tiles, grid = processor.load_images(images)
        visual = {
            "pixel_values_images": tiles,
            "image_tile_counts": torch.tensor([tiles.shape[0]], dtype=torch.long),
            "image_grids": torch.tensor([grid], dtype=torch.long),
        }
        return visual, None, tiles.shape[0] * model.config.tokens_per_image
    return {}, None, 0


def chat(
    model,
    video,
    question: str,
    processor=None,
    history: list[dict] | None = None,
    max_frames: int | None = None,
    min_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
    images=None,
    generation_config: dict | None = None,
    streamer=None,
    return_history: bool = False,
    visual_dropout_spec=None,
    max_clips_per_batch: int = 16,
    decode_batch_frames: int = 64,
    kv_compression=None,
    kv_budget: int | None = None,
    kv_options: dict | None = None,
    **generate_kwargs,
):
    """See ``VideoFlashForConditionalGeneration.chat``."""
    processor = processor or load_processor(model)
    tokenizer = processor.tokenizer
    device = model.device
    sampling = {"max_frames": max_frames, "min_frames": min_frames, "start": start, "end": end,
                "fps": generate_kwargs.pop("fps", None)}
    visual, time_msg, n_visual = _visual_inputs(model, processor, video, images, sampling,
                                                max_clips_per_batch, decode_batch_frames)
    inputs = processor.prompt_inputs(question, history, visual=bool(visual), time_msg=time_msg)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    visual = {k: v.to(device) for k, v in visual.items()}

    gen = {"do_sample": False, "max_new_tokens": 512}
    model_gen = getattr(model, "generation_config", None)
    if model_gen is not None and getattr(model_gen, "max_new_tokens", None):
        gen["max_new_tokens"] = model_gen.max_new_tokens
    gen.update(generation_config or {})
    gen.update(generate_kwargs)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if "eos_token_id" not in gen:
        eos = [im_end] if isinstance(im_end, int) and im_end >= 0 else []
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        if eos:
            gen["eos_token_id"] = eos
    if "pad_token_id" not in gen:
        if tokenizer.pad_token_id is not None:
            gen["pad_token_id"] = tokenizer.pad_token_id
        else:
            eos = gen.get("eos_token_id", 0)
            gen["pad_token_id"] = eos[0] if isinstance(eos, (list, tuple)) else eos

    total = inputs["input_ids"].shape[1] - (1 if visual else 0) + n_visual + int(gen["max_new_tokens"])
    text_config = model.config.text_config
    native = text_config.max_position_embeddings
    if total > native:
        factor = math.ceil(total / native)
        warnings.warn(
            f"the conversation may reach {total} tokens, beyond the LLM's {native} positions; "
            f"enable YaRN with model.enable_yarn({factor}) (CLI: --yarn {factor}) or sample fewer frames",
            stacklevel=3,
        )

    with visual_dropout(model.config, visual_dropout_spec), torch.no_grad():
        if kv_compression is None:
            out = model.generate(**inputs, **visual, streamer=streamer, **gen)
            new_tokens = out[0, inputs["input_ids"].shape[1]:]
        else:
            if "video_embeds" not in visual:
                raise ValueError("kv_compression compresses a video's KV cache; this turn has no video")
            new_tokens = _compressed_generate(model, inputs["input_ids"], visual["video_embeds"], kv_compression,
                                              kv_budget, kv_options, streamer, gen, _video_key_of(model))
    answer = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    if not return_history:
        return answer
    new_history = [dict(m) for m in (history or [])]
    new_history += [{"role": "user", "content": str(question)}, {"role": "assistant", "content": answer}]
    return answer, new_history


def _video_key_of(model):
    cached = getattr(model, "_videoflash_visual_cache", None)
    return cached[0] if cached is not None else None


def _compressed_generate(model, input_ids, video_embeds, spec, budget, options, streamer, gen, video_key):
    """The answer's token ids by chunked prefill under a KV-compression policy (chunked_prefill.py).

    Video-X²L's prefill does not depend on the question: it is kept on the model for the next turn
    about the same video (same file, same frames, same text before the video)."""
    from .chunked_prefill import ChunkedPrefillEngine, VideoX2L, make_policy, videoflash_input

    unknown = sorted(k for k in gen if k not in _COMPRESSED_GENERATE_KEYS and k != "pad_token_id")
    if unknown:
        raise ValueError(f"with kv_compression, generation takes only {', '.join(_COMPRESSED_GENERATE_KEYS)}; "
                         f"got {', '.join(unknown)}")
    options = dict(options or {})
    policy = make_policy(spec, budget=budget, **options)
    inp, decoder = videoflash_input(model, input_ids, video_embeds, policy.chunk_frames)
    engine = ChunkedPrefillEngine(decoder, policy)
    if isinstance(policy, VideoX2L):
        prefix = tuple(input_ids[0, : inp.video_start + 1].tolist())
        schedule = tuple(sorted(decoder.dropout.items()))
        key = (video_key, prefix, schedule, decoder.dropout_position, policy.alpha_low, policy.alpha_high,
               policy.score, policy.chunk_frames)
        stored = getattr(model, "_videoflash_kv_store", None)
        if video_key is not None and stored is not None and stored[0] == key:
            store = stored[1]
        else:
            model._videoflash_kv_store = None  # free the previous video's store first
            store = engine.prefill_video(inp)
            model._videoflash_kv_store = (key, store) if video_key is not None else None
        logits = engine.answer(store, inp)
    else:
        logits = engine.prefill(inp)
    args = {k: v for k, v in gen.items() if k in _COMPRESSED_GENERATE_KEYS}
    tokens = engine.generate(logits, streamer=streamer, prompt_ids=input_ids, **args)
    model._videoflash_kv_engine = engine  # its cache and policy, for statistics (the CLI's --stats)
    return torch.tensor(tokens, dtype=torch.long)
