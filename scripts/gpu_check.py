#!/usr/bin/env python
"""The project's GPU checks that run in one Python process: attention kernels and bf16 ZeRO-3 steps.

Run by ``scripts/gpu_check.sh`` (which adds the long-video searches); each check writes one JSON
line to ``--out`` and prints a summary.

- ``attention``: the UMT encoder's attention at its real shapes (UMT-L: 16 heads of 64; 4-frame
  clips at 224 px = 784 tokens, at 448 px = 3136) in bf16, through every kernel this machine has --
  flash-attn's packed kernel (when installed) and SDPA's flash / memory-efficient / cuDNN backends --
  against SDPA's math backend in float32: the largest absolute error and the time per call.
- ``packed``: attention over one packed row of samples (samples of 1.5k-12k tokens summing to 32k,
  at Qwen2-7B's 28 query / 4 KV heads of 128) in bf16 through every varlen kernel this machine has --
  flash-attn's ``flash_attn_varlen_func``, PyTorch's ``varlen_attn``, FlexAttention with a document
  mask (compiled), SDPA sample by sample, and the dense block-diagonal mask where it fits -- against
  causal SDPA sample by sample in float32: the largest absolute error of the output and of the
  gradients, the time of forward + backward, and the kernel ``packed_varlen`` picks here.
- ``train``: bf16 training steps of a VideoChat-Flash-2B-shaped model with random weights (UMT-L at
  224 px, 16 tokens per frame, a Qwen2.5-1.5B-shaped LLM) under DeepSpeed ZeRO-3 over NCCL, launched
  by torchrun, on synthetic frames and tokens (no data files): tokens/s, model TFLOP/s per GPU and MFU
  (videoflash.train.flops, vision FLOPs counted and shown on their own), peak memory.
- ``train_packed``: the same model and engine on one packed row of 32k tokens per step (24 samples of
  64 frames and 341 text tokens, ``packed_varlen`` attention, the chunked loss): the throughput
  figure of training with ``data.pack_tokens``; ``mfu`` counts every FLOP, ``mfu_llm`` the LLM's
  alone (lmms-engine's convention for video).

``--tiny`` shrinks every shape so that the same code runs on a CPU (gloo, fp32 there): the smoke
test of this script on a machine without a GPU.

    torchrun --nproc_per_node 1 scripts/gpu_check.py --out gpu.jsonl           # on the GPU machine
    torchrun --nproc_per_node 1 scripts/gpu_check.py --tiny --out /tmp/x.jsonl  # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from videoflash.console import quiet_known_noise  # noqa: E402

QWEN25_1P5B = dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                   num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                   max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True)
TINY_TEXT = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096)
UMT_L_224 = dict(width=1024, depth=23, num_heads=16, image_size=224, patch_size=16)
TINY_VISION = dict(width=64, depth=2, num_heads=4, image_size=32, patch_size=16)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats: int) -> float:
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def check_attention(device, tiny: bool) -> list[dict]:
    """Every attention kernel against the float32 math backend, at UMT's shapes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from videoflash.model import umt

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads, dim = (4, 16) if tiny else (16, 64)
    shapes = [(2, 64)] if tiny else [(16, 784), (4, 3136)]  # (clips, tokens): 224 px and 448 px clips
    rows = []
    for clips, n in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        qkv = torch.randn(clips, n, 3, heads, dim, generator=g).to(device)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        with sdpa_kernel(SDPBackend.MATH):
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        kernels = {}
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_math", SDPBackend.MATH)):
            def run(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype))
            kernels[name] = run
        if umt.flash_attn_available() and device.type == "cuda":
            from flash_attn import flash_attn_qkvpacked_func

            kernels["flash_attn"] = lambda: flash_attn_qkvpacked_func(qkv.to(dtype)).transpose(1, 2)
        for name, fn in kernels.items():
            try:
                out = fn()
            except RuntimeError as exn:  # a backend this GPU / dtype / shape does not support
                rows.append({"check": "attention", "kernel": name, "clips": clips, "tokens": n,
                             "error": str(exn).splitlines()[0][:200]})
                continue
            err = (out.float() - ref).abs().max().item()
            sec = _time(fn, device, 3 if tiny else 20)
            flops = 4 * clips * heads * n * n * dim
            rows.append({"check": "attention", "kernel": name, "dtype": str(dtype), "clips": clips, "tokens": n,
                         "max_abs_err": err, "ms": sec * 1e3, "tflops": flops / sec / 1e12})
    return rows


def check_packed(device, tiny: bool) -> list[dict]:
    """The kernels of packed rows against causal SDPA on each sample alone in float32."""
    from videoflash.model import packing

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads, kv_heads, dim = (4, 2, 16) if tiny else (28, 4, 128)
    lengths = [40, 7, 81, 1] if tiny else [8192, 1500, 12000, 6000, 4576]
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    g = torch.Generator(device="cpu").manual_seed(0)
    base = [torch.randn(total, h, dim, generator=g).to(device) for h in (heads, kv_heads, kv_heads)]
    weight = torch.randn(total, heads, dim, generator=g).to(device)
    scale = dim**-0.5

    def grads(fn, dt, backward=True):
        q, k, v = (x.to(dt).requires_grad_(backward) for x in base)
        out = fn(q, k, v)
        if not backward:
            return out.float(), None
        (out.float() * weight).sum().backward()
        return out.float(), [x.grad.float() for x in (q, k, v)]

    ref_out, ref_grads = grads(lambda q, k, v: packing.per_sample_attention(q, k, v, cu, scale), torch.float32)
    longest = max(lengths)
    kernels = {"sdpa_per_sample": (lambda q, k, v: packing.per_sample_attention(q, k, v, cu, scale), True)}
    if total <= 8192:
        kernels["sdpa_block_diagonal"] = (lambda q, k, v: packing.block_diagonal_attention(q, k, v, cu, scale), True)
    if device.type == "cuda":
        kernels["flex_document"] = (lambda q, k, v: packing.flex_document_attention(q, k, v, cu, scale), True)
        if packing._flash_attn_varlen() is not None:
            kernels["flash_attn_varlen"] = (lambda q, k, v: packing._flash_attn_varlen()(
                q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest,
                softmax_scale=scale, causal=True), True)  # fmt: skip
        if packing._torch_varlen() is not None:
            kernels["torch_varlen"] = (lambda q, k, v: packing._torch_varlen()(
                q, k, v, cu, cu, longest, longest, scale=scale, window_size=(-1, 0), enable_gqa=True), True)  # fmt: skip
    else:  # FlexAttention's eager reference runs forward only on CPU
        kernels["flex_document_eager"] = (lambda q, k, v: packing.flex_document_attention(q, k, v, cu, scale,
                                                                                          compiled=False), False)  # fmt: skip
    rows = []
    for name, (fn, backward) in kernels.items():
        try:
            out, grad = grads(fn, dtype, backward)
            sec = _time(lambda: grads(fn, dtype, backward), device, 3 if tiny else 10)
        except Exception as exn:  # a kernel this GPU / build / shape does not support
            rows.append({"check": "packed", "kernel": name, "tokens": total, "error": f"{type(exn).__name__}: "
                         + str(exn).splitlines()[0][:200]})  # fmt: skip
            continue
        row = {"check": "packed", "kernel": name, "dtype": str(dtype), "tokens": total, "samples": len(lengths),
               "max_abs_err": (out - ref_out).abs().max().item(), "ms_fwd_bwd" if backward else "ms_fwd": sec * 1e3}
        if grad is not None:
            row["max_abs_grad_err"] = max((a - b).abs().max().item() for a, b in zip(grad, ref_grads))
        rows.append(row)
    rows.append({"check": "packed", "kernel": "chosen", "packed_varlen_uses": packing.varlen_backend(device, dim)})
    return rows


def synthetic_batch(config, text: dict, device, frames: int, text_tokens: int, samples: int) -> dict:
    """``samples`` samples of ``frames`` random frames and ``text_tokens`` random tokens each (the image
    placeholder at position 8, every token supervised); more than one: one packed row."""
    size = config.vision_config["image_size"]
    ids = torch.randint(0, text["vocab_size"] - 2, (1, samples * text_tokens), device=device)
    ids[0, 8::text_tokens] = config.image_token_id
    batch = {
        "input_ids": ids, "attention_mask": torch.ones_like(ids),
        "labels": ids.masked_fill(ids == config.image_token_id, -100),
        "pixel_values_videos": torch.randint(0, 256, (samples * frames, size, size, 3), dtype=torch.uint8, device=device),
        "video_frame_counts": torch.full((samples,), frames, device=device),
    }
    if samples > 1:
        batch["sample_lengths"] = torch.full((1, samples), text_tokens, device=device)
    return batch


def check_train(device, tiny: bool, steps: int, frames: int, text_tokens: int, samples: int = 1) -> dict:
    """bf16 ZeRO-3 steps on synthetic data; tokens/s, TFLOP/s, MFU, peak memory. ``samples > 1``: one
    packed row of that many samples per step (``packed_varlen`` attention, the fastest varlen kernel
    here), as training with ``data.pack_tokens`` runs."""
    import deepspeed

    from videoflash.config.schema import DeepSpeedSchema
    from videoflash.model.configuration_videoflash import VideoFlashConfig
    from videoflash.model.modeling_videoflash import VideoFlashForConditionalGeneration
    from videoflash.train.ds_config import render
    from videoflash.train.flops import FlopsModel, peak_tflops

    bf16 = device.type == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    text = TINY_TEXT if tiny else QWEN25_1P5B
    vision = TINY_VISION if tiny else UMT_L_224
    config = VideoFlashConfig(vision_config=vision, text_config=dict(text), tokens_per_clip=64 if not tiny else 4,
                              tokens_per_image=64 if not tiny else 4, image_token_id=text["vocab_size"] - 1)
    torch.manual_seed(0)
    model = VideoFlashForConditionalGeneration(config)
    if samples > 1:
        from videoflash.model.packing import VARLEN

        model.set_attn_implementation(VARLEN)
    else:
        model.set_attn_implementation("sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # LLM and UMT
    ds = render(DeepSpeedSchema(), global_batch=world, micro_batch=1, world_size=world, bf16=bf16, grad_clip=1.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    batch = synthetic_batch(config, text, device, frames, text_tokens, samples)
    counted = {"video_frame_counts": batch["video_frame_counts"].cpu(), "image_tile_counts": torch.tensor([0]),
               "num_text_tokens": torch.full((samples,), text_tokens - 1),
               "num_visual_tokens": torch.full((samples,), frames // 4 * config.tokens_per_clip),
               "labels": batch["labels"].cpu()}  # the head runs on the supervised tokens only
    if "sample_lengths" in batch:
        counted["sample_lengths"] = batch["sample_lengths"].cpu()
    flops = FlopsModel.from_config(config, ["vision_tower", "connector", "language_model"]).batch(counted)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.detach().item())
    sec = sorted(times[1:] or times)[len(times[1:] or times) // 2]  # median after the first step
    tokens = samples * (text_tokens - 1 + frames // 4 * config.tokens_per_clip)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = peak_tflops(name)
    row = {
        "check": "train_packed" if samples > 1 else "train", "samples": samples,
        "attn": model.language_model.config._attn_implementation, "device": name, "world": world, "bf16": bf16, "zero_stage": 3,
        "params_m": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters()) / 1e6,
        "frames": frames, "tokens": tokens, "step_s": sec, "tokens_per_s": tokens / sec,
        "tflops": flops["total"] / sec / 1e12, "vision_tflops": (flops["vision"] + flops["connector"]) / sec / 1e12,
        "mfu": flops["total"] / sec / 1e12 / peak if peak else None,
        "mfu_llm": flops["llm"] / sec / 1e12 / peak if peak else None, "losses": losses,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON lines written here")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a CPU smoke run of the same code")
    p.add_argument("--checks", nargs="+", default=["attention", "packed", "train", "train_packed"],
                   choices=["attention", "packed", "train", "train_packed"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--frames", type=int, default=256, help="train: frames per sample (16 tokens each)")
    p.add_argument("--text-tokens", type=int, default=1024, help="train: text tokens per sample")
    a = p.parse_args(argv)
    quiet_known_noise()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank = int(os.environ.get("RANK", "0"))
    rows = []
    if "attention" in a.checks and rank == 0:
        rows += check_attention(device, a.tiny)
    if "packed" in a.checks and rank == 0:
        rows += check_packed(device, a.tiny)
    if "train" in a.checks:
        rows.append(check_train(device, a.tiny, a.steps, a.frames if not a.tiny else 8, a.text_tokens if not a.tiny else 32))
    if "train_packed" in a.checks:  # one row of 32k tokens: 24 samples of 64 frames (1024 visual) + 341 text
        rows.append(check_train(device, a.tiny, a.steps, 64 if not a.tiny else 8, 341 if not a.tiny else 16,
                                samples=24 if not a.tiny else 3))
    if rank == 0:
        with open(a.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        for r in rows:
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
