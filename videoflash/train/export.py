"""The stage-end export: one consolidated HF checkpoint that the next stage and users load with
``from_pretrained`` (config.json, safetensors, tokenizer files, the model's code for
``trust_remote_code`` when the model registers it, and ``training_state.json``).

Under ZeRO-3 every rank holds a slice of each parameter. ``_zero3_consolidated_16bit_state_dict`` is
a collective that gathers them into a full state dict on rank 0 (the same call HF's Trainer and
Accelerate use); rank 0 casts it to ``train.export_dtype`` and writes it with ``save_pretrained``
into a temporary directory that is renamed into place, so a crash never leaves half an export.

A stage that trained adapters exports them merged into the weights (``export: merge``, the default:
an ordinary checkpoint), or the base weights plus ``adapter/`` in peft's format (``export:
adapter``); see :mod:`adapters`. Files of the starting point that describe how the model is asked
(``processor_config.json`` of a converted release) are carried into the export.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from . import adapters, distributed

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Collective. The whole model's state dict on rank 0 (None elsewhere)."""
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
    return state if engine.global_rank == 0 else None


class _PlainNames:
    """``named_parameters`` of an adapted model under the plain names the export writes."""

    def __init__(self, model):
        self.model = model

    def named_parameters(self, remove_duplicate: bool = True):
        for name, p in self.model.named_parameters(remove_duplicate=remove_duplicate):
            if not adapters.is_adapter_param(name):
                yield name.replace(".base_layer.", "."), p


def tied_duplicates(model) -> set[str]:
    """Names of parameters that are another parameter under a second name (tied embeddings): the
    export keeps the first name only, as ``save_pretrained`` of an unsharded model does."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n for group in names.values() for n in group[1:]}


def export_hf(engine, tokenizer, out_dir: str | os.PathLike, dtype: str, info: dict[str, Any], *,
              lora=None, adapter_export: str = "merge", base_dir: Path | None = None,
              carry: list[Path] = ()) -> Path:
    """Collective. Write the HF export of ``engine.module`` to ``out_dir`` (rank 0 writes).

    ``lora`` (peft's ``LoraConfig``) when the model holds adapters: merged, or shipped in
    ``adapter/`` (``adapter_export``); ``base_dir`` supplies full-precision base weights (QLoRA);
    ``carry`` lists files copied into the export when they exist."""
    out_dir = Path(out_dir)
    state = full_state_dict(engine)
    if engine.global_rank == 0:
        model = engine.module
        cast = DTYPES[dtype]
        tied = tied_duplicates(_PlainNames(model)) if lora is not None else tied_duplicates(model)
        adapter_state = None
        if lora is not None:
            base = adapters.read_weights(base_dir) if base_dir is not None else None
            if adapter_export == "merge":
                state = adapters.merge_adapters(state, lora.lora_alpha / lora.r, base)
            else:
                state, adapter_state = adapters.split_adapters(state)
        state = {k: (v.to(cast) if v.is_floating_point() else v).contiguous() for k, v in state.items() if k not in tied}
        tmp = out_dir.with_name(f".tmp_{out_dir.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.config.dtype = cast
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
        if adapter_state is not None:
            adapters.save_adapter(tmp / "adapter", {k: v.to(cast) for k, v in adapter_state.items()}, lora)
        for path in carry:
            if Path(path).is_file():
                shutil.copy2(path, tmp / Path(path).name)
        (tmp / "training_state.json").write_text(json.dumps(info, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    distributed.barrier()
    return out_dir
