"""Peak memory of the training loss and of the vision tower: the memory-bounded paths against the
paths they replace, measured in the same invocation.

    python scripts/bench_memory.py [--tokens 16384 --vocab 151936 --hidden 1536 --dtype bf16]
                                   [--frames 512 --image-size 224 --width 96 --depth 4 --clips-per-call 8]

**Loss** (forward + backward of the output head and the cross-entropy over ``--tokens`` positions):

- *full logits* (before issue 12): the head at every position, logits ``[T, V]`` returned by the model
  (so held), upcast to float32, ``F.cross_entropy(..., ignore_index=-100)``;
- *chunked* (now, ``videoflash.model.chunked_loss`` as the model calls it): the supervised positions
  selected, then ``[chunk, V]`` float32 logits at a time, their gradients computed in the forward.

Both at every position supervised (the cross-entropy alone, the strictest case), and at
``--supervised`` of the positions (a video sample: most positions are visual tokens and prompt).

**Vision** (forward + backward of ``encode_video`` on ``--frames`` frames of a narrow UMT at the real
patch count, block activation checkpointing on as in training): every clip in one call against
``--clips-per-call`` clips per call (``vision_clips_per_call``, each call checkpointed).

**How memory is measured, and why.** This machine has no GPU (no allocator statistics) and 23 GB of
memory shared with other jobs, while the full-logits loss at 16k x 152k needs tens of GB. Each case
runs in a fresh child process under :class:`LiveBytes`, a ``TorchDispatchMode`` that sees every
tensor an operator returns (forward, backward, recomputation) and adds up the bytes of the storages
alive, new ones counted once, each subtracted when it is freed: the peak is the quantity
``torch.cuda.max_memory_allocated`` reports, less the caching allocator's rounding, and counts only
what the computation allocates (the inputs, parameters included, are there before and not counted).
The full-size loss runs on PyTorch's ``meta`` device: real operators, real shapes and dtypes, no
data, so no memory and no arithmetic (nothing but the accounting is exercised; the tests check the
values). To show the accounting is that of real memory, the loss at ``--check-tokens`` x
``--check-vocab`` and the vision cases run on real CPU tensors and also report the process's peak
resident memory over the case (``ru_maxrss`` after it minus the resident size before it, from the
kernel; it includes allocator slack, workspaces and anything else the process touched), and the
values (loss, a gradient norm) that the two sides must share. The children run with
``MALLOC_MMAP_THRESHOLD_=131072`` (unless set): glibc otherwise raises its mmap threshold after large
frees, serves chunk-sized blocks from its heap and keeps them resident once freed, so the RSS peak
of the chunked paths would show glibc's retention rather than what was alive (0.38 GB RSS for 0.08
GB alive at 256 frames; 0.09 GB RSS with the fixed threshold).

The last line prints the peak ratios (memory-bounded / before); issue 12's goal is <= 0.3x for the
loss at 16k tokens x 150k vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GB = 1e9


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created while the mode is active and still alive, and their peak.

    Every operator's outputs are looked at; a storage is counted once, when first seen (an in-place
    result or a view shares a counted one), and subtracted when it is freed (a weak-reference
    finaliser on the storage, which PyTorch keeps as one Python object per storage). Storages that
    existed before (:meth:`ignore`: inputs, parameters, buffers) are never counted, nor their views."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}

    def ignore(self, tensors) -> "LiveBytes":
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._see(t.untyped_storage(), counted=False)
        return self

    def _see(self, storage, counted: bool) -> None:
        key = id(storage)
        if key in self._seen:
            return
        size = storage.nbytes() if counted else 0
        self._seen[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t.untyped_storage(), counted=True)
        return out


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


# --------------------------------------------------------------------------------------------------
# the cases (each in its own child process)
# --------------------------------------------------------------------------------------------------
def loss_case(spec: dict) -> dict:
    """Forward + backward of the loss head over ``tokens`` positions, ``supervised`` of them labelled."""
    from videoflash.model.chunked_loss import lm_cross_entropy

    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    t, v, h, s = spec["tokens"], spec["vocab"], spec["hidden"], spec["supervised"]
    g = torch.Generator().manual_seed(0)
    make = (lambda *shape: torch.randn(*shape, generator=g).mul_(0.05).to(dtype)) if device.type == "cpu" else (
        lambda *shape: torch.empty(*shape, dtype=dtype, device=device))
    hidden = make(1, t, h).requires_grad_(True)  # the decoder's output (after the final norm)
    weight = make(v, h).requires_grad_(True)  # the output head
    labels = torch.full((1, t), -100, dtype=torch.long)
    labels[0, t - s:] = torch.randint(0, v, (s,), generator=g)  # the last s positions supervised
    positions = torch.arange(t - s, t - 1)  # where labels[:, 1:] is set (the targets of the shifted loss)
    labels = labels.to(device)
    tracker = LiveBytes().ignore([hidden, weight, labels])
    rss_before = _rss_now()
    start = time.perf_counter()
    with tracker:
        if spec["path"] == "full":
            logits = F.linear(hidden, weight)  # [1, T, V]: the model returned them, so they stay alive
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        else:
            targets = labels[:, 1:]
            if device.type == "meta":  # boolean selection needs the values; the same rows by index
                rows = hidden[:, :-1].flatten(0, 1).index_select(0, positions.to(device))
                y = targets.flatten().index_select(0, positions.to(device))
            else:
                keep = targets != -100
                rows, y = hidden[:, :-1][keep], targets[keep]
            loss = lm_cross_entropy(rows, weight, y, chunk_size=spec["chunk"])
        loss.backward()
        logits = None
    seconds = time.perf_counter() - start
    out = {"peak_gb": tracker.peak / GB, "seconds": seconds}
    if device.type == "cpu":
        out.update(rss_gb=(_rss_peak() - rss_before) / GB, loss=float(loss.detach()),
                   grad_norm=float(weight.grad.float().norm() + hidden.grad.float().norm()))
    return out


def vision_case(spec: dict) -> dict:
    """Forward + backward of ``encode_video`` on ``frames`` frames (training mode, block checkpointing)."""
    from videoflash.model.configuration_videoflash import VideoFlashConfig
    from videoflash.model.modeling_videoflash import VideoFlashForConditionalGeneration

    text = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    vision = dict(width=spec["width"], depth=spec["depth"], num_heads=spec["heads"], image_size=spec["image_size"],
                  patch_size=16)
    config = VideoFlashConfig(vision_config=vision, text_config=text, tokens_per_clip=64, image_token_id=63,
                              vision_clips_per_call=spec["per_call"])
    torch.manual_seed(0)
    model = VideoFlashForConditionalGeneration(config).train()
    model.activation_checkpointing_enable({"use_reentrant": False})  # train.activation_checkpointing (default)
    g = torch.Generator().manual_seed(1)
    size = spec["image_size"]
    frames = torch.randint(0, 256, (spec["frames"], size, size, 3), generator=g, dtype=torch.uint8)
    tracker = LiveBytes().ignore([frames, *model.parameters(), *model.buffers()])
    rss_before = _rss_now()
    start = time.perf_counter()
    with tracker:
        tokens = model.encode_video(frames)
        loss = tokens.float().square().mean()
        loss.backward()
        tokens = None
    seconds = time.perf_counter() - start
    grad = model.vision_tower.patch_embed.proj.weight.grad
    return {"peak_gb": tracker.peak / GB, "rss_gb": (_rss_peak() - rss_before) / GB, "seconds": seconds,
            "loss": float(loss.detach()), "grad_norm": float(grad.norm())}


def child(spec: dict) -> None:
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    case = loss_case if spec["part"] == "loss" else vision_case
    if spec.get("device", "cpu") == "cpu":
        # the same code once on small shapes first: what the first call of a kernel or of the autograd
        # engine sets up for good (libraries, thread pools, workspaces) is then not charged to the case
        small = dict(spec, tokens=64, supervised=min(64, spec.get("supervised", 0)), vocab=256, hidden=64, chunk=16,
                     frames=8, image_size=32, depth=1)
        case(small)
    print(json.dumps(case(spec)))


def run_child(spec: dict) -> dict:
    # glibc's malloc raises its mmap threshold after large frees (up to 32 MB), so chunk-sized blocks
    # then come from its heap and stay resident after being freed: a fixed threshold makes every
    # block of 128 KB or more an mmap that is returned when freed, so RSS follows the live memory
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"case {spec} failed:\n{res.stdout[-2000:]}{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--vocab", type=int, default=151936)  # Qwen2 / Qwen2.5
    p.add_argument("--hidden", type=int, default=1536)  # Qwen2.5-1.5B (VideoChat-Flash-2B); 3584 for 7B
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--chunk", type=int, default=4096)  # model.loss_chunk_size
    p.add_argument("--supervised", type=float, default=0.1, help="share of positions supervised (second loss case)")
    p.add_argument("--check-tokens", type=int, default=2048)
    p.add_argument("--check-vocab", type=int, default=32768)
    p.add_argument("--check-hidden", type=int, default=1024)
    p.add_argument("--frames", type=int, default=512)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--clips-per-call", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads per case (0: torch's default)")
    p.add_argument("--parts", default="loss,check,vision", help="which of loss, check, vision to run")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0

    dtype = {"bf16": "bfloat16", "fp32": "float32"}[args.dtype]
    print(f"torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} cpus, "
          f"threads {args.threads or torch.get_num_threads()}", flush=True)
    ratios = {}
    parts = set(args.parts.split(","))

    # 1. the loss at full size, on the meta device (accounting only)
    base = dict(part="loss", device="meta", dtype=dtype, tokens=args.tokens, vocab=args.vocab, hidden=args.hidden,
                chunk=args.chunk, threads=args.threads)
    for label, supervised in (("all supervised", args.tokens), (f"{args.supervised:.0%} supervised",
                                                                max(2, int(args.tokens * args.supervised)))):
        if "loss" not in parts:
            break
        full = run_child(dict(base, path="full", supervised=supervised))
        chunked = run_child(dict(base, path="chunked", supervised=supervised))
        ratio = chunked["peak_gb"] / full["peak_gb"]
        ratios[f"loss ({label})"] = ratio
        print(f"loss {args.tokens} tokens ({label}: {supervised}) x {args.vocab} vocab, hidden {args.hidden}, "
              f"{args.dtype}, meta: full logits {full['peak_gb']:.2f} GB | chunked ({args.chunk} rows) "
              f"{chunked['peak_gb']:.2f} GB | {ratio:.3f}x", flush=True)

    if "check" in parts:
        check_loss(args, base)
    if "vision" in parts:
        ratios[f"vision ({args.frames} frames)"] = vision(args)
    print("peak memory vs before: " + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items()))
    return 0


def check_loss(args, base: dict) -> None:
    """2. the same accounting on real CPU tensors at a size that fits, against the process's RSS."""
    check = dict(base, device="cpu", dtype="float32", tokens=args.check_tokens, vocab=args.check_vocab,
                 hidden=args.check_hidden, supervised=args.check_tokens, chunk=min(args.chunk, args.check_tokens // 4))
    full = run_child(dict(check, path="full"))
    chunked = run_child(dict(check, path="chunked"))
    same = abs(full["loss"] - chunked["loss"]) <= 1e-4 * abs(full["loss"]) and \
        abs(full["grad_norm"] - chunked["grad_norm"]) <= 1e-3 * abs(full["grad_norm"])
    print(f"check on CPU: loss {args.check_tokens} x {args.check_vocab} x {args.check_hidden} fp32 (chunk "
          f"{check['chunk']}): full logits {full['peak_gb']:.3f} GB tracked / {full['rss_gb']:.3f} GB RSS, "
          f"{full['seconds']:.1f} s | chunked {chunked['peak_gb']:.3f} GB tracked / {chunked['rss_gb']:.3f} GB RSS, "
          f"{chunked['seconds']:.1f} s | tracked {chunked['peak_gb'] / full['peak_gb']:.3f}x, "
          f"RSS {chunked['rss_gb'] / full['rss_gb']:.3f}x | same loss and gradients: {same}", flush=True)


def vision(args) -> float:
    """3. the vision tower at many frames, real CPU tensors."""
    vis = dict(part="vision", frames=args.frames, image_size=args.image_size, width=args.width, depth=args.depth,
               heads=args.heads, threads=args.threads)
    one = run_child(dict(vis, per_call=0))
    chunks = run_child(dict(vis, per_call=args.clips_per_call))
    same = abs(one["loss"] - chunks["loss"]) <= 1e-5 * abs(one["loss"]) and \
        abs(one["grad_norm"] - chunks["grad_norm"]) <= 1e-4 * abs(one["grad_norm"])
    clips, patches = args.frames // 4, 4 * (args.image_size // 16) ** 2
    ratio = chunks["peak_gb"] / one["peak_gb"]
    print(f"vision {args.frames} frames ({clips} clips of {patches} patches) at {args.image_size} px, UMT width "
          f"{args.width} depth {args.depth}, fp32, CPU: one call {one['peak_gb']:.3f} GB tracked / "
          f"{one['rss_gb']:.3f} GB RSS, {one['seconds']:.1f} s | {args.clips_per_call} clips per call "
          f"{chunks['peak_gb']:.3f} GB tracked / {chunks['rss_gb']:.3f} GB RSS, {chunks['seconds']:.1f} s | "
          f"tracked {ratio:.3f}x, RSS {chunks['rss_gb'] / one['rss_gb']:.3f}x | same loss and gradients: {same}",
          flush=True)
    return ratio


if __name__ == "__main__":
    sys.exit(main())
