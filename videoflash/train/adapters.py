"""Low-rank adapters for fine-tuning (LoRA, QLoRA through peft) and how they leave training.

``stage.adapter`` (``AdapterSchema``) names module groups -- the LLM's attention projections, its
MLP, the connector, the vision tower's linear layers -- which :func:`target_pattern` turns into one
regular expression over module names. :func:`add_adapters` injects peft's LoRA layers into the
model *in place* (``peft.inject_adapter_in_model``: no wrapper, so parameter names keep their
top-level part -- ``language_model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` -- and
per-part learning rates, freezing and checkpoints work unchanged). It runs after the model loaded
under ``zero.Init`` and before ``deepspeed.initialize``: the new adapter tensors are ordinary ones,
which ``deepspeed.initialize`` partitions like the rest. Every rank seeds the same generator first,
so the ranks draw the same initial ``A`` matrices (``B`` starts at zero: the adapted model starts
equal to the base).

At the end of the stage the consolidated state dict leaves in one of two forms:

- :func:`merge_adapters` (``export: merge``): each adapted layer's weight becomes
  ``W + (alpha / r) * B @ A`` (computed in float32) under the plain name, adapter tensors dropped:
  an ordinary checkpoint that loads and runs without peft;
- :func:`split_adapters` (``export: adapter``): the base weights under their plain names, and the
  adapter tensors in peft's saved format (``base_model.model.<module>.lora_A.weight``, with
  ``adapter_config.json``) for ``peft.PeftModel.from_pretrained(base, "<export>/adapter")``.

QLoRA loads the LLM's linear layers in 4 bits (bitsandbytes NF4, compute and storage in the run's
dtype, so that ZeRO-3 can shard them); it needs CUDA and bitsandbytes, and
:func:`quantization_config` stops the run at once, saying which is missing. Its merge takes the
full-precision base weights of the quantized layers from the starting directory (``stage.init``),
since the 4-bit tensors only approximate the weights the adapters are added to. (Written to the
bitsandbytes + ZeRO-3 recipe; not yet run on a GPU in this project's tests.)
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

ADAPTER_NAME = "default"

#: module groups -> regular expressions over module names of VideoFlashForConditionalGeneration
TARGET_PATTERNS = {
    "llm_attention": r"language_model\.model\.layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|o_proj)",
    "llm_mlp": r"language_model\.model\.layers\.\d+\.mlp\.(?:gate_proj|up_proj|down_proj)",
    "connector": r"connector\.linear_[12]",
    "vision_tower": r"vision_tower\.blocks\.\d+\.(?:attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)",
}

#: modules never quantized by QLoRA (they are small, or train in full)
QLORA_SKIP = ["vision_tower", "connector", "lm_head"]

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<name>[^.]+)\.weight$")


class AdapterError(RuntimeError):
    """The adapter settings cannot run here (QLoRA without CUDA or bitsandbytes, no module matched)."""


def target_pattern(targets: list[str]) -> str:
    """One anchored regular expression matching the modules of every group in ``targets``."""
    unknown = [t for t in targets if t not in TARGET_PATTERNS]
    if unknown:
        raise AdapterError(f"unknown adapter targets {unknown}; choose from {sorted(TARGET_PATTERNS)}")
    return "^(?:" + "|".join(TARGET_PATTERNS[t] for t in targets) + ")$"


def lora_config(adapter):
    """The peft ``LoraConfig`` of ``stage.adapter``."""
    from peft import LoraConfig

    return LoraConfig(r=int(adapter.rank), lora_alpha=float(adapter.alpha), lora_dropout=float(adapter.dropout),
                      target_modules=target_pattern(list(adapter.targets)), bias="none")


def add_adapters(model: nn.Module, adapter, seed: int):
    """Inject LoRA layers into ``model`` in place; returns the ``LoraConfig``. Raises
    :class:`AdapterError` when no module matches the targets."""
    from peft import inject_adapter_in_model

    config = lora_config(adapter)
    pattern = re.compile(config.target_modules)
    if not any(pattern.fullmatch(name) for name, _ in model.named_modules()):
        raise AdapterError(f"no module of the model matches the adapter targets {list(adapter.targets)}")
    torch.manual_seed(seed)  # the same initial A on every rank
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    return config


def is_adapter_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def quantization_config(device: torch.device, dtype: torch.dtype):
    """The bitsandbytes 4-bit config of QLoRA, or :class:`AdapterError` saying what is missing."""
    if device.type != "cuda":
        raise AdapterError("QLoRA (stage.adapter.kind=qlora) needs a CUDA GPU: bitsandbytes' 4-bit kernels run "
                           "only there; on this machine use stage.adapter.kind=lora")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise AdapterError("QLoRA needs bitsandbytes (pip install bitsandbytes); or use stage.adapter.kind=lora") from err
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype,
                              llm_int8_skip_modules=list(QLORA_SKIP))


def _lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A, B)}`` of the adapter tensors in ``state``."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _LORA_KEY.match(key)
        if m:
            found.setdefault(m["module"], {})[m["ab"]] = value
    missing = [mod for mod, ab in found.items() if set(ab) != {"A", "B"}]
    if missing:
        raise AdapterError(f"adapter tensors without their pair: {missing[:3]}")
    return {mod: (ab["A"], ab["B"]) for mod, ab in found.items()}


def _base_name(key: str) -> str:
    return key.replace(".base_layer.", ".")


def merge_adapters(state: dict[str, torch.Tensor], scaling: float,
                   base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Fold every adapter into its layer: ``W + scaling * B @ A`` (float32, cast back to ``W``'s
    dtype) under the plain name; adapter tensors dropped, other entries kept as they are.
    ``base`` (QLoRA) supplies the full-precision ``W`` by plain name where ``state`` holds a packed
    4-bit tensor of another shape, and bitsandbytes' quantization state (``*.weight.absmax`` ...)
    is left out."""
    pairs = _lora_pairs(state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if is_adapter_param(key):
            continue
        name = _base_name(key)
        if base is not None:
            if ".weight." in name:
                continue  # quantization state of a 4-bit weight
            if name in base and value.shape != base[name].shape:
                value = base[name].to(value.dtype if value.is_floating_point() else base[name].dtype)
        module = key[: -len(".base_layer.weight")] if key.endswith(".base_layer.weight") else None
        if module in pairs:
            a, b = pairs[module]
            value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
        out[name] = value
    return out


def split_adapters(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(base weights under plain names, adapter tensors in peft's saved naming)``."""
    base, adapter = {}, {}
    for key, value in state.items():
        m = _LORA_KEY.match(key)
        if m:
            adapter[f"base_model.model.{m['module']}.lora_{m['ab']}.weight"] = value
        else:
            base[_base_name(key)] = value
    return base, adapter


def save_adapter(out_dir: Path, adapter_state: dict[str, torch.Tensor], config) -> None:
    """``adapter_model.safetensors`` + ``adapter_config.json`` (peft's layout) in ``out_dir``."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter_state.items()}, str(out_dir / "adapter_model.safetensors"))
    config.base_model_name_or_path = ".."
    config.save_pretrained(str(out_dir))


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every safetensors tensor of an HF directory (QLoRA's full-precision base)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(str(path)))
    return state
