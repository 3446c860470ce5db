"""Export a checkpoint (or a training run) as a self-contained Hugging Face model repo.

``python -m videoflash.export <run dir or checkpoint> <out dir> [--push <repo_id>] [--private]``
writes ``<out dir>`` with

- ``config.json`` with ``auto_map`` (``AutoConfig``, ``AutoModel``, ``AutoModelForCausalLM``,
  ``AutoModelForImageTextToText``, ``AutoProcessor``) and the model's own code: every ``.py`` of
  ``videoflash/model``, flat (the package imports only torch, transformers, timm, numpy, the
  standard library and -- lazily -- decord and Pillow; this is checked before anything is written);
- sharded safetensors (``model-0000x-of-0000N.safetensors`` + ``model.safetensors.index.json``);
- the tokenizer with its chat template, and ``processor_config.json``: the frame policy of the
  training stage (sampling rule, min/max frames), the frame size and normalisation, token counts;
- ``generation_config.json`` (greedy, ``eos = <|im_end|>``) and a model card (``README.md``) with
  the training recipe, stage, data mix and measured results of the run.

The source is checked before it loads (``videoflash.config.files.hf_dir_problems``): a garbled JSON
file, a missing shard or a truncated safetensors file stops the export with that file named.
The directory is written under a temporary name and renamed when complete; then every ``auto_map``
target is checked to exist, the shards are checked against the model's parameters, and the export is
loaded back with the Auto classes (``trust_remote_code``) and compared parameter by parameter.
``--push`` then uploads it (:mod:`videoflash.inference.hub`); a failed upload leaves the export as it
is and prints the command that retries it.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from videoflash.config.files import hf_dir_problems

from .hub import HubPublisher, PublishError
from .run_info import RunInfo, Source, gather_run_info, resolve_source

MODEL_CLASS = "VideoFlashForConditionalGeneration"
AUTO_MAP = {
    "AutoConfig": "configuration_videoflash.VideoFlashConfig",
    "AutoModel": f"modeling_videoflash.{MODEL_CLASS}",
    "AutoModelForCausalLM": f"modeling_videoflash.{MODEL_CLASS}",
    "AutoModelForImageTextToText": f"modeling_videoflash.{MODEL_CLASS}",
    "AutoProcessor": "processing_videoflash.VideoFlashProcessor",
}
#: what the model package may import (absolute imports); everything else must be a sibling
#: (decord, torchcodec, av, PIL, flash_attn, liger_kernel: imported inside ``try`` when first needed)
ALLOWED_IMPORTS = {"torch", "transformers", "timm", "numpy", "decord", "torchcodec", "av", "PIL", "flash_attn",
                   "liger_kernel", "__future__"}  # fmt: skip
#: used when the run directory does not record the stage's frame policy (stages 3-4 of VideoChat-Flash;
#: the published inference setting samples at most 512 frames)
DEFAULT_POLICY = {"frame_policy": "dynamic_fps1", "min_frames": 64, "max_frames": 512}
DTYPES = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ExportError(RuntimeError):
    """The export cannot be written or did not pass its checks."""


@dataclass
class ExportResult:
    out_dir: Path
    info: RunInfo
    files: dict[str, Any] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)


def model_package_dir() -> Path:
    from videoflash import model as model_pkg

    return Path(model_pkg.__file__).resolve().parent


def check_model_package(folder: Path) -> list[str]:
    """Problems that would stop the package from loading as remote code: absolute imports outside
    :data:`ALLOWED_IMPORTS` and the standard library, or relative imports of missing siblings."""
    problems = []
    stdlib = set(sys.stdlib_module_names)
    files = {p.stem for p in folder.glob("*.py")}
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    top = alias.name.split(".")[0]
                    if top not in ALLOWED_IMPORTS and top not in stdlib:
                        problems.append(f"{path.name}:{node.lineno} imports {alias.name}")
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    top = (node.module or "").split(".")[0]
                    if top not in ALLOWED_IMPORTS and top not in stdlib:
                        problems.append(f"{path.name}:{node.lineno} imports from {node.module}")
                elif node.level == 1:
                    if node.module is None:
                        names = [a.name for a in node.names]
                        problems += [f"{path.name}:{node.lineno} 'from . import {n}': write 'from .{n} import ...' "
                                     "(transformers copies only relative imports of that form)" for n in names]
                    elif node.module.split(".")[0] not in files:
                        problems.append(f"{path.name}:{node.lineno} imports the missing sibling .{node.module}")
                else:
                    problems.append(f"{path.name}:{node.lineno} imports from a parent package (the export is flat)")
    return problems


def _defined_classes(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return {n.name for n in tree.body if isinstance(n, ast.ClassDef)}


def check_auto_map(folder: Path) -> list[str]:
    """Every ``auto_map`` target of the export's JSON files names a file of the export that defines
    the class; returns the problems found."""
    problems = []
    for name in ("config.json", "processor_config.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            if name != "tokenizer_config.json":
                problems.append(f"{name} is missing")
            continue
        auto_map = json.loads(path.read_text()).get("auto_map") or {}
        if name == "config.json" and not auto_map:
            problems.append("config.json has no auto_map")
        for auto_class, targets in auto_map.items():
            for target in targets if isinstance(targets, (list, tuple)) else [targets]:
                if target is None:
                    continue
                if "--" in target:  # "repo--module.Class" points at another repo
                    problems.append(f"{name}: auto_map[{auto_class}] points outside the export: {target}")
                    continue
                module, _, cls = target.rpartition(".")
                file = folder / f"{module}.py"
                if not file.is_file():
                    problems.append(f"{name}: auto_map[{auto_class}] = {target}, but {file.name} is not in the export")
                elif cls not in _defined_classes(file):
                    problems.append(f"{name}: auto_map[{auto_class}] = {target}, but {file.name} defines no {cls}")
    return problems


def check_weights(folder: Path, model) -> list[str]:
    """The shards hold every parameter and buffer of ``model`` that is saved, with its shape
    (tied weights are saved once), and nothing else; every shard of the index exists."""
    from safetensors import safe_open

    problems = []
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        return ["no model.safetensors(.index.json) in the export"]
    saved: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        if not (folder / shard).is_file():
            problems.append(f"shard {shard} listed in the index is missing")
            continue
        with safe_open(str(folder / shard), framework="pt") as f:
            for key in f.keys():
                saved[key] = tuple(f.get_slice(key).get_shape())
    state = model.state_dict()
    saved_ptrs = {state[k].data_ptr() for k in saved if k in state}
    for key, tensor in state.items():
        if key in saved:
            if saved[key] != tuple(tensor.shape):
                problems.append(f"{key}: saved shape {saved[key]} != model {tuple(tensor.shape)}")
        elif tensor.data_ptr() not in saved_ptrs:
            problems.append(f"{key} is not in the shards")
    problems += [f"{key} is in the shards but not in the model" for key in saved if key not in state]
    return problems


def load_check(folder: Path, reference, full: bool = True) -> list[str]:
    """Load the export with the Auto classes and ``trust_remote_code`` (config, processor and, when
    ``full``, the weights, compared with ``reference``'s)."""
    from transformers import AutoConfig, AutoModel, AutoProcessor

    done = []
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    if type(config).__name__ != "VideoFlashConfig":
        raise ExportError(f"AutoConfig loaded {type(config).__name__}, not VideoFlashConfig")
    done.append("AutoConfig")
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    if type(processor).__name__ != "VideoFlashProcessor":
        raise ExportError(f"AutoProcessor loaded {type(processor).__name__}, not VideoFlashProcessor")
    done.append("AutoProcessor")
    if full:
        loaded = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype="auto")
        if type(loaded).__name__ != MODEL_CLASS:
            raise ExportError(f"AutoModel loaded {type(loaded).__name__}")
        ref = reference.state_dict()
        for key, value in loaded.state_dict().items():
            if key not in ref or not torch.equal(value, ref[key]):
                raise ExportError(f"the exported {key} differs from the source model's")
        del loaded
        done.append("AutoModel (weights equal)")
    return done


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("videoflash")
    except PackageNotFoundError:
        return "?"


#: processor fields a checkpoint's own processor_config.json carries into its export (a converted
#: release's rules, docs/model.md), under the stage's recorded frame policy and the overrides
CARRIED_PROCESSOR_FIELDS = ("frame_policy", "min_frames", "max_frames", "image_mode", "frame_rules", "resize",
                            "multi_image", "grid_pinpoints", "system_prompt", "add_time_message")


def _carried_processor(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / "processor_config.json"
    if not path.is_file():
        return {}
    fields = json.loads(path.read_text())
    return {k: fields[k] for k in CARRIED_PROCESSOR_FIELDS if k in fields}


def _policy(info: RunInfo, overrides: dict[str, Any], carried: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    recorded = info.frame_policy()
    policy = dict(DEFAULT_POLICY)
    policy.update(carried or {})
    policy.update(recorded)
    policy.update({k: v for k, v in overrides.items() if v is not None})
    if recorded:
        origin = f"stage {info.source.stage_id}'s config.yaml"
    elif carried:
        origin = "the checkpoint's processor_config.json"
    else:
        origin = "videoflash's defaults: the source does not record the stage's frame policy"
        info.missing.append("the stage's frame policy is not recorded; the processor uses "
                            f"{DEFAULT_POLICY['frame_policy']} {DEFAULT_POLICY['min_frames']}..{DEFAULT_POLICY['max_frames']} frames")
    if any(v is not None for v in overrides.values()):
        origin += " with command-line overrides"
    return policy, origin


def export(
    source,
    out_dir,
    *,
    max_shard_size: str | int = "5GB",
    dtype: str = "auto",
    frame_policy: str | None = None,
    min_frames: int | None = None,
    max_frames: int | None = None,
    image_mode: str | None = None,
    yarn: float | None = None,
    yarn_original: int | None = None,
    visual_dropout: str | None = None,
    max_new_tokens: int = 512,
    name: str | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
    full_load_check: bool = True,
    log=print,
) -> ExportResult:
    """Write the HF export of ``source`` (a checkpoint or run directory) to ``out_dir``; see module doc."""
    from transformers import AutoTokenizer, GenerationConfig

    from videoflash.model.inference_videoflash import parse_dropout
    from videoflash.model.modeling_videoflash import VideoFlashForConditionalGeneration
    from videoflash.model.processing_videoflash import CHATML_TEMPLATE, IMAGE_TOKEN, VideoFlashProcessor

    out_dir = Path(out_dir).expanduser().resolve()
    src: Source = resolve_source(source)
    if out_dir == src.checkpoint or out_dir in src.checkpoint.parents:
        raise ExportError(f"the export directory {out_dir} must not contain the source {src.checkpoint}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    damaged = hf_dir_problems(src.checkpoint)
    if damaged:
        raise ExportError(f"the checkpoint {src.checkpoint} is damaged:\n  " + "\n  ".join(damaged))
    cfg_json = json.loads((src.checkpoint / "config.json").read_text())
    if cfg_json.get("model_type") != "videoflash":
        raise ExportError(f"{src.checkpoint} holds a {cfg_json.get('model_type')!r} model, not a videoflash one")
    pkg = model_package_dir()
    problems = check_model_package(pkg)
    if problems:
        raise ExportError("videoflash/model is not self-contained, so the export could not load as remote code:\n  "
                          + "\n  ".join(problems))
    info = gather_run_info(src)
    log(f"source: {src.checkpoint}" + (f" (run {src.run_root}, stage {src.stage_id})" if src.run_root else ""))

    model = VideoFlashForConditionalGeneration.from_pretrained(src.checkpoint, dtype=DTYPES[dtype]).eval()
    tokenizer = AutoTokenizer.from_pretrained(src.checkpoint, config=model.config)  # no remote-code prompt
    vocab = tokenizer.get_vocab()
    if IMAGE_TOKEN not in vocab or vocab[IMAGE_TOKEN] != model.config.image_token_id:
        raise ExportError(
            f"the tokenizer's {IMAGE_TOKEN} id ({vocab.get(IMAGE_TOKEN)}) is not the model's image_token_id "
            f"({model.config.image_token_id})"
        )
    if "<|im_end|>" not in vocab:
        raise ExportError("the tokenizer has no <|im_end|> token; the ChatML prompt and the stop token need it")
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
        info.missing.append("the checkpoint's tokenizer had no chat template; the export uses Qwen2's ChatML")
    if yarn:
        params = model.enable_yarn(yarn, yarn_original)
        log(f"YaRN: {params}")
    if visual_dropout is not None:
        schedule = parse_dropout(visual_dropout)
        if schedule is None:
            model.config.visual_dropout_in_inference = False
        else:
            model.config.set_visual_dropout(*schedule, inference=True)

    policy, policy_origin = _policy(info, dict(frame_policy=frame_policy, min_frames=min_frames,
                                               max_frames=max_frames, image_mode=image_mode),
                                    _carried_processor(src.checkpoint))
    processor = VideoFlashProcessor.from_model_config(tokenizer, model.config, **policy)
    log(f"frame policy ({policy_origin}): {processor.frame_policy} {processor.min_frames}..{processor.max_frames} "
        f"frames at {processor.image_size}px")

    im_end = vocab["<|im_end|>"]
    eos = [im_end] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id not in (None, im_end) else [])
    model.generation_config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=int(max_new_tokens),
        eos_token_id=eos if len(eos) > 1 else eos[0],
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else im_end,
        bos_token_id=tokenizer.bos_token_id,
    )
    model.config.auto_map = dict(AUTO_MAP)
    model.config.architectures = [MODEL_CLASS]

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    VideoFlashProcessor.register_for_auto_class("AutoProcessor")
    processor.save_pretrained(tmp)
    for path in sorted(pkg.glob("*.py")):
        shutil.copy2(path, tmp / path.name)
    if (src.checkpoint / "adapter" / "adapter_config.json").is_file():  # stage.adapter.export=adapter
        shutil.copytree(src.checkpoint / "adapter", tmp / "adapter")
        log("the source ships a LoRA adapter beside its base weights: copied to adapter/ "
            "(load it with peft.PeftModel.from_pretrained(model, '<export>/adapter'))")

    shards = sorted(p.name for p in tmp.glob("*.safetensors"))
    files = {
        "shards": len(shards),
        "max_shard_size": max_shard_size,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "code": sorted(p.name for p in pkg.glob("*.py")),
        "videoflash_version": _version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "frame_policy_origin": policy_origin,
    }
    from .model_card import render_card

    run_name = (info.stage_config or {}).get("name")
    card_name = name or (f"{run_name} (stage {src.stage_id})" if run_name else out_dir.name)
    card = render_card(info, name=card_name, config=model.config, processor=processor,
                       num_params=sum(p.numel() for p in model.parameters()), files=files, repo_id=repo_id)
    card.save(tmp / "README.md")

    problems = check_auto_map(tmp) + check_weights(tmp, model)
    if problems:
        raise ExportError(f"the export in {tmp} failed its checks:\n  " + "\n  ".join(problems))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    result = ExportResult(out_dir, info, files, checks=["model package self-contained", "auto_map targets", "weights"])
    try:
        result.checks += load_check(out_dir, model, full=full_load_check)
    except Exception as exn:
        bad = out_dir.with_name(out_dir.name + ".invalid")
        shutil.rmtree(bad, ignore_errors=True)
        out_dir.rename(bad)
        raise ExportError(f"the export does not load back ({exn}); it was moved to {bad} for inspection") from exn
    log(f"export written to {out_dir}: {len(shards)} shard(s), checks passed: {', '.join(result.checks)}")
    return result


def verify_folder(folder: Path) -> list[str]:
    """Checks of an existing export that need no model: auto_map targets and shard completeness."""
    problems = check_auto_map(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            if not (folder / shard).is_file():
                problems.append(f"shard {shard} is missing")
    elif not (folder / "model.safetensors").is_file():
        problems.append("no weights (model.safetensors or model.safetensors.index.json)")
    if not (folder / "README.md").is_file():
        problems.append("README.md (the model card) is missing")
    return problems


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m videoflash.export",
        description="Export a videoflash checkpoint or training run as a Hugging Face model repo "
        "(trust_remote_code), optionally uploading it.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="SOURCE OUT: a run directory, stage directory or HF checkpoint, and the output directory; "
                   "with --upload-only, the one existing export directory")
    p.add_argument("--push", metavar="REPO_ID", help="create the hub repo (if needed) and upload the export")
    p.add_argument("--private", action="store_true", help="create the hub repo as private")
    p.add_argument("--revision", help="upload to this branch of the hub repo")
    p.add_argument("--upload-only", action="store_true", help="upload an existing export (retry of a failed --push)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="weights dtype (default: as saved)")
    p.add_argument("--frame-policy", help="override the stage's frame policy (dynamic_fps1, middle, fps:<rate>)")
    p.add_argument("--min-frames", type=int)
    p.add_argument("--max-frames", type=int)
    p.add_argument("--image-mode", choices=["anyres", "square"])
    p.add_argument("--yarn", type=float, metavar="FACTOR", help="save the config with YaRN rope scaling")
    p.add_argument("--yarn-original", type=int, metavar="N", help="native context of YaRN (default: the LLM's)")
    p.add_argument("--visual-dropout", metavar="SPEC",
                   help="default inference dropout: published | none | 'layer:ratio:kind,...'")
    p.add_argument("--max-new-tokens", type=int, default=512, help="generation_config default")
    p.add_argument("--name", help="model card title")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-load-check", action="store_true",
                   help="skip loading the weights back (config, processor and shard checks still run)")
    return p


def main(argv: list[str] | None = None, publisher: HubPublisher | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.upload_only:
        if len(args.paths) != 1 or not args.push:
            print("--upload-only takes one existing export directory and --push REPO_ID", file=sys.stderr)
            return 2
        out_dir = Path(args.paths[0]).expanduser().resolve()
        problems = verify_folder(out_dir)
        if problems:
            print(f"{out_dir} is not a complete export:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
    else:
        if len(args.paths) != 2:
            print("usage: python -m videoflash.export SOURCE OUT [--push REPO_ID] [--private]", file=sys.stderr)
            return 2
        try:
            result = export(
                args.paths[0], args.paths[1], max_shard_size=args.max_shard_size, dtype=args.dtype,
                frame_policy=args.frame_policy, min_frames=args.min_frames, max_frames=args.max_frames,
                image_mode=args.image_mode, yarn=args.yarn, yarn_original=args.yarn_original,
                visual_dropout=args.visual_dropout, max_new_tokens=args.max_new_tokens, name=args.name,
                repo_id=args.push, overwrite=args.overwrite, full_load_check=not args.no_load_check,
            )
        except (ExportError, FileNotFoundError, ValueError) as exn:
            print(f"export failed: {exn}", file=sys.stderr)
            return 1
        out_dir = result.out_dir
    if not args.push:
        return 0
    publisher = publisher or HubPublisher()
    try:
        res = publisher.publish(out_dir, args.push, private=args.private, revision=args.revision)
    except PublishError as exn:
        print(str(exn), file=sys.stderr)
        return 3
    print(f"uploaded {out_dir} to {res.repo_url}")
    return 0
