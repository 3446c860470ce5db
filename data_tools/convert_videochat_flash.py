"""Convert a released VideoChat-Flash checkpoint directory into a videoflash checkpoint directory.

    python -m data_tools.convert_videochat_flash SRC_DIR OUT_DIR [--dtype keep|bf16|fp16|fp32]

SRC_DIR is an HF snapshot of e.g. ``OpenGVLab/VideoChat-Flash-Qwen2-7B_res448`` (config.json with the
``mm_*`` fields, safetensors weights, Qwen2 tokenizer files). OUT_DIR loads with
``VideoFlashForConditionalGeneration.from_pretrained`` and computes the same logits: the weights are
renamed (never changed), the UMT encoder keeps its 23 used blocks, the MLP projector becomes the
connector, the ``<image>`` placeholder is added to the tokenizer as a special token, and the in-LLM
compression fields become the visual-dropout schedule. The layouts are in
``shared/reference/checkpoint_layouts.md``.

So that the converted checkpoint is *asked* as the original is, the output also carries the
release's processing (``processor_config.json``): the frames of its ``chat()`` (``dynamic_fps1``,
64..512 frames, 4 per clip), its resolution (224 or 448 by the tower), its ``image_grid_pinpoints``,
the release's span and min/max rules, full-size decode + bicubic, several images padded to a
square with the mean colour; and the tokenizer's chat template becomes the release's ``qwen_2``
conversation (system "You are a helpful assistant."), whatever template the release's tokenizer
carries. The release's tokenizer is read without remote code and without any question asked
(its config.json names remote classes; the tokenizer itself is Qwen2's).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch

#: released prefix -> videoflash prefix, tried in order
KEY_MAP = (
    ("model.vision_tower.vision_tower.encoder.vision_layernorm.", "vision_tower.norm."),
    ("model.vision_tower.vision_tower.encoder.", "vision_tower."),
    ("model.mm_projector.mlp.0.", "connector.linear_1."),
    ("model.mm_projector.mlp.2.", "connector.linear_2."),
    ("model.embed_tokens.", "language_model.model.embed_tokens."),
    ("model.layers.", "language_model.model.layers."),
    ("model.norm.", "language_model.model.norm."),
    ("lm_head.", "language_model.lm_head."),
)

#: the fields of a VideoChat-Flash config.json that are not the Qwen2 config's own
MM_FIELDS_PREFIXES = ("mm_", "llm_compress", "llm_image_token", "image_", "frame_", "vision_", "tokenizer_", "use_pos")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

#: the frames of the release's ``chat()`` (its ``load_video``: dynamic_fps1, at least 64 frames, at
#: most ``max_num_frames`` = 512 by default)
RELEASE_FRAMES = dict(frame_policy="dynamic_fps1", min_frames=64, max_frames=512)
#: the system turn of the release's ``qwen_2`` conversation
RELEASE_SYSTEM_PROMPT = "You are a helpful assistant."


class ConversionError(ValueError):
    """The source directory is not a VideoChat-Flash checkpoint this converter understands."""


def rename_key(key: str) -> str | None:
    for old, new in KEY_MAP:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def _read_weights(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors"))
    index = src / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [src / n for n in names]
    if not files:
        raise ConversionError(f"{src}: no *.safetensors weights found")
    state = {}
    for f in files:
        if not f.exists():
            raise ConversionError(f"{src}: the index names {f.name}, which is missing")
        state.update(load_file(str(f)))
    return state


def dropout_schedule(cfg: dict) -> dict:
    """The released in-LLM compression fields -> VideoFlashConfig's visual-dropout fields.

    ``llm_compress_layer_list`` are 1-indexed layers after which tokens drop; the ratio list starts
    with the 1.0 of the full set; ``llm_compress_type`` is ``attention``, ``uniform`` or
    ``uniformN_attention`` (drop points 0..N uniform, later ones text-guided)."""
    layers = [int(x) for x in cfg.get("llm_compress_layer_list") or []]
    ratios = [float(x) for x in cfg.get("llm_image_token_ratio_list") or []]
    if not layers:
        return {}
    if len(ratios) == len(layers) + 1:
        ratios = ratios[1:]
    if len(ratios) != len(layers):
        raise ConversionError(f"llm_image_token_ratio_list {ratios} does not fit llm_compress_layer_list {layers}")
    kind = cfg.get("llm_compress_type", "attention")
    match = re.fullmatch(r"uniform(\d+)_attention", kind)
    if kind == "attention":
        kinds = ["text"] * len(layers)
    elif kind == "uniform":
        kinds = ["uniform"] * len(layers)
    elif match:
        last_uniform = int(match.group(1))
        kinds = ["uniform" if i <= last_uniform else "text" for i in range(len(layers))]
    else:
        raise ConversionError(f"unknown llm_compress_type {kind!r}")
    return dict(
        visual_dropout_layers=layers,
        visual_dropout_keep_ratios=ratios,
        visual_dropout_kinds=kinds,
        visual_dropout_position="compact",
        visual_dropout_in_inference=bool(cfg.get("mm_llm_compress", False)),
    )


def grid_pinpoints(cfg: dict, tile: int) -> list[list[int]] | None:
    """The release's ``image_grid_pinpoints`` as ``[width, height]`` canvases in pixels.

    LLaVA writes them either as a list of pixel pairs or as ``"(1x1),...,(6x6)"``: every
    ``(i, j)`` from the first pair to the last (``i`` = width in tiles, outer), times the tile size."""
    raw = cfg.get("image_grid_pinpoints")
    if raw is None:
        return None
    if isinstance(raw, str):
        pairs = re.findall(r"\((\d+)x(\d+)\)", raw)
        if not pairs:
            raise ConversionError(f"image_grid_pinpoints {raw!r} is neither pixel pairs nor '(AxB),...,(CxD)'")
        (w0, h0), (w1, h1) = (tuple(map(int, p)) for p in (pairs[0], pairs[-1]))
        return [[i * tile, j * tile] for i in range(w0, w1 + 1) for j in range(h0, h1 + 1)]
    try:
        out = [[int(w), int(h)] for w, h in raw]
    except (TypeError, ValueError) as err:
        raise ConversionError(f"image_grid_pinpoints {raw!r} is not a list of [width, height] pairs") from err
    bad = [p for p in out if p[0] % tile or p[1] % tile]
    if bad:
        raise ConversionError(f"image_grid_pinpoints {bad[:3]} are not multiples of the {tile}px tile")
    return out


def read_release_tokenizer(src: Path):
    """The release's Qwen2 tokenizer, without remote code and without an interactive question.

    Its config.json names remote classes (``auto_map``); ``AutoTokenizer`` would read it and ask
    whether to run them. ``tokenizer.json`` defines the tokenizer completely, so it is read as it is
    (with ``tokenizer_config.json``'s special tokens); without one, a plain Qwen2 config stands in
    for the model's and remote code stays off."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config

    try:
        if (src / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(src)
        return AutoTokenizer.from_pretrained(src, config=Qwen2Config(), trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ConversionError(f"{src}: cannot read the tokenizer without remote code: {err}") from err


def write_release_processor(out: Path, tokenizer, config, cfg: dict) -> None:
    """``processor_config.json`` with the release's processing (see the module doc)."""
    from videoflash.model.processing_videoflash import VideoFlashProcessor

    aspect = str(cfg.get("image_aspect_ratio", "anyres_nopad"))
    processor = VideoFlashProcessor.from_model_config(
        tokenizer, config, **RELEASE_FRAMES,
        image_mode="anyres" if aspect.startswith("anyres") else "square",
        grid_pinpoints=grid_pinpoints(cfg, config.image_size),
        frame_rules="videochat_flash", resize="exact", multi_image="pad",
        system_prompt=RELEASE_SYSTEM_PROMPT,
    )
    processor.save_pretrained(out)


def convert(src: str | Path, out: str | Path, dtype: str = "keep", max_shard_size: str = "5GB") -> Path:
    """Convert ``src`` into ``out``; returns ``out``. Raises ConversionError naming what is wrong."""
    from huggingface_hub import save_torch_state_dict

    from videoflash.model.configuration_videoflash import VideoFlashConfig
    from videoflash.model.processing_videoflash import CHATML_TEMPLATE

    src, out = Path(src), Path(out)
    cfg_path = src / "config.json"
    if not cfg_path.exists():
        raise ConversionError(f"{src}: no config.json (is this a checkpoint directory?)")
    cfg = json.loads(cfg_path.read_text())
    for field in ("mm_vision_tower", "mm_hidden_size"):
        if field not in cfg:
            raise ConversionError(f"{cfg_path}: missing {field!r}; not a VideoChat-Flash config")
    tower = cfg["mm_vision_tower"]
    if "umt" not in tower:
        raise ConversionError(f"{cfg_path}: vision tower {tower!r} is not supported (only UMT: umt-large, umt-hd-large)")
    if cfg.get("mm_projector_type", "tome16_mlp_hd64") != "tome16_mlp_hd64":
        raise ConversionError(f"{cfg_path}: projector {cfg['mm_projector_type']!r} is not supported")

    state = _read_weights(src)
    renamed, unknown = {}, []
    for key, value in state.items():
        new = rename_key(key)
        if new is None:
            unknown.append(key)
        else:
            renamed[new] = value
    if unknown:
        raise ConversionError(f"{src}: {len(unknown)} weights of an unknown layout, e.g. {unknown[:5]}")
    blocks = {int(m.group(1)) for k in renamed if (m := re.match(r"vision_tower\.blocks\.(\d+)\.", k))}
    if not blocks or blocks != set(range(len(blocks))):
        raise ConversionError(f"{src}: vision blocks {sorted(blocks)[:5]}... are not 0..N-1")
    width = int(cfg["mm_hidden_size"])
    vision = dict(
        width=width,
        depth=len(blocks),
        num_heads=width // 64,
        image_size=448 if "hd" in tower else 224,
        frames_per_clip=int(cfg.get("mm_local_num_frames", 4)),
        select_layer=int(cfg.get("mm_vision_select_layer", -2)),
    )

    text = {k: v for k, v in cfg.items() if not k.startswith(MM_FIELDS_PREFIXES)}
    for k in ("architectures", "auto_map", "model_type", "_name_or_path", "transformers_version"):
        text.pop(k, None)
    text["model_type"] = "qwen2"

    tokenizer = read_release_tokenizer(src)
    tokenizer.chat_template = CHATML_TEMPLATE  # the release's qwen_2 conversation
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    embed_key = "language_model.model.embed_tokens.weight"
    vocab = renamed[embed_key].shape[0]
    if image_token_id >= vocab:  # grow the tables by one mean row (never the case for Qwen2's padded vocab)
        for key in (embed_key, "language_model.lm_head.weight"):
            if key in renamed:
                w = renamed[key]
                renamed[key] = torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype)], 0)
        text["vocab_size"] = image_token_id + 1

    pinpoints = grid_pinpoints(cfg, vision["image_size"])
    # the largest grid side, which training's image tiling uses (the processor uses the pinpoints)
    max_grid = max(max(w, h) for w, h in pinpoints) // vision["image_size"] if pinpoints else 6
    config = VideoFlashConfig(
        vision_config=vision,
        text_config=text,
        tokens_per_clip=64,
        tokens_per_image=64,
        max_grid=max_grid,
        image_token_id=image_token_id,
        **dropout_schedule(cfg),
    )
    config.architectures = ["VideoFlashForConditionalGeneration"]
    if dtype != "keep":
        renamed = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in renamed.items()}
    if config.tie_word_embeddings:
        renamed.pop("language_model.lm_head.weight", None)

    out.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(renamed, out, max_shard_size=max_shard_size)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_release_processor(out, tokenizer, config, cfg)
    gen = src / "generation_config.json"
    if gen.exists():
        shutil.copy(gen, out / "generation_config.json")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="VideoChat-Flash checkpoint directory (config.json + safetensors + tokenizer)")
    parser.add_argument("out", help="output videoflash checkpoint directory")
    parser.add_argument("--dtype", choices=["keep", *DTYPES], default="keep")
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.out, args.dtype, args.max_shard_size)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (load with VideoFlashForConditionalGeneration.from_pretrained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
