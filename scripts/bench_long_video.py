#!/usr/bin/env python
"""Long-video prefill: time and peak memory, with and without progressive visual dropout in the LLM.

CPU (default): a small VideoFlash (UMT width 64 at 64 px; a Qwen2 of width 256 with 12 layers, 4
visual tokens per frame) answers a question about 64 .. several thousand frames. For every frame
count the visual tokens are computed once, in bounded batches (``encode_video_chunked``), then the
prompt is prefilled (``use_cache=True``, last-token logits, as ``generate`` does) twice: without
dropout and with the published schedule scaled to the model's depth (VideoChat-Flash: after layer 4
of 28 keep 75% uniformly, after layer 18 keep 25% text-guided; here after layers round(4/28 n) and
round(18/28 n)). Peak memory is the resident set's high-water mark (VmHWM, reset before each
prefill) above the resident set at its start. The last lines print the ratios dropout / no dropout.

    python scripts/bench_long_video.py                          # CPU, 64 256 1024 4096 frames
    python scripts/bench_long_video.py --frames 64 512 --layers 28 --dropout published

GPU (``--device cuda``, when one is available): a 7B-class LLM (Qwen2-7B's shape: hidden 3584, 28
layers, 28/4 heads, random bf16 weights) with 16 tokens per frame; visual tokens are random (the
encoder runs in bounded chunks, so it never limits the frame count); frame counts double from
``--start-frames`` until a prefill runs out of memory, then bisect to ``--resolution`` frames.
Prints, with and without dropout, the largest frame count that fits, its prefill time and peak
memory (``torch.cuda.max_memory_allocated``).

    python scripts/bench_long_video.py --device cuda --search [--yarn 4]
    python scripts/bench_long_video.py --device cuda --frames 1024 4096 8192   # a table, no search

KV-cache compression (``--kv``): the same prefill (through the first answer token's logits) by five
methods -- none, visual dropout, AdaReTaKe (``--kv-budget`` tokens, default the visual tokens of
``--budget-frames`` frames, so that its cache, text included, is no bigger than the uncompressed one
there), Video-X²L (defaults: chunks of 32 frames, alpha 2 / 32, top 3) and
dropout + AdaReTaKe -- with the prefill time, the peak memory and the KV cache the answer is decoded
on (bytes on the device; Video-X²L also keeps its two KVs per chunk in host memory). A KV cache as
big as the uncompressed one at ``--budget-frames`` frames then holds how many frames with each
method: the last line prints that ratio for AdaReTaKe (the paper: 256 -> 2048 frames, x8).
With ``--device cuda --search`` each method's largest frame count is searched.

    python scripts/bench_long_video.py --kv --frames 256 512 1024 2048
    python scripts/bench_long_video.py --kv --device cuda --search --yarn 4

Answer quality at a fixed context budget (``--needle EXPORT``): a model trained on the synthetic
corpus (``make quickstart``) answers the needle questions of its held-out set (``--heldout``) on long
videos, with the visual KV of ``--needle-frames SMALL LARGE``: uncompressed with SMALL frames
(what fits), uncompressed with LARGE frames (over the budget, for reference), and AdaReTaKe (keep /
reforge positions) and Video-X²L with LARGE frames held to SMALL frames' visual tokens. The last
line prints the accuracy of AdaReTaKe over that of the subsampled baseline.

    python scripts/bench_long_video.py --needle runs/quickstart/stage3/export --heldout data/quickstart/heldout.jsonl
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from videoflash.model.chunked_prefill import (  # noqa: E402
    AdaReTaKe,
    ChunkedPrefillEngine,
    VideoX2L,
    make_policy,
    videoflash_input,
)
from videoflash.model.configuration_videoflash import VideoFlashConfig  # noqa: E402
from videoflash.model.inference_videoflash import PUBLISHED_DROPOUT, parse_dropout  # noqa: E402
from videoflash.model.modeling_videoflash import VideoFlashForConditionalGeneration  # noqa: E402

QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, rope_theta=1_000_000.0, max_position_embeddings=32768)
UMT_L = dict(width=1024, depth=23, num_heads=16, image_size=224, patch_size=16)


def _ratio(a: float, b: float) -> str:
    return f"x{a / b:.2f}" if b > 0 else "n/a"


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so that small blocks freed by an earlier
    measurement (Video-X²L's many per-chunk KVs) do not hide the next one's growth."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class CpuPeak:
    """Peak resident memory above the start of the block (VmHWM is reset by writing 5 to clear_refs)."""

    def __enter__(self):
        gc.collect()
        _malloc_trim()
        self.base = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return self

    def __exit__(self, *exc):
        self.peak = _status("VmHWM") - self.base
        return False


def scaled_dropout(layers: int, spec: str):
    """The dropout schedule: ``published`` as is when the LLM is deep enough, else its layers scaled
    to ``layers`` (4/28 and 18/28 of the depth); any other spec as parse_dropout reads it."""
    if spec != "published-scaled":
        return parse_dropout(spec)
    if layers > max(PUBLISHED_DROPOUT["layers"]):
        return parse_dropout("published")
    points = sorted({max(1, min(layers - 1, round(x / 28 * layers))) for x in PUBLISHED_DROPOUT["layers"]})
    if len(points) < 2:
        raise SystemExit(f"an LLM of {layers} layers is too shallow for two drop points")
    return points, list(PUBLISHED_DROPOUT["keep_ratios"]), list(PUBLISHED_DROPOUT["kinds"])


def build_model(args, device, dtype) -> VideoFlashForConditionalGeneration:
    torch.manual_seed(0)
    if args.device == "cuda":
        text = dict(QWEN2_7B, model_type="qwen2")
        vision = dict(UMT_L)
        tokens_per_clip = 64
    else:
        text = dict(model_type="qwen2", hidden_size=args.width, intermediate_size=int(args.width * 2.75),
                    num_hidden_layers=args.layers, num_attention_heads=args.width // 64,
                    num_key_value_heads=max(1, args.width // 128), vocab_size=1024, rope_theta=1_000_000.0,
                    max_position_embeddings=32768)
        vision = dict(width=64, depth=2, num_heads=4, image_size=64, patch_size=16)
        tokens_per_clip = args.tokens_per_frame * 4
    config = VideoFlashConfig(vision_config=vision, text_config=text, tokens_per_clip=tokens_per_clip,
                              tokens_per_image=tokens_per_clip, image_token_id=text["vocab_size"] - 1)
    config.text_config._attn_implementation = "sdpa"
    if args.device == "cuda":
        # build in place, in bf16: 7B parameters never exist in fp32 or on the host
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = VideoFlashForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(default)
        model = model.to(dtype)
    else:
        model = VideoFlashForConditionalGeneration(config).to(dtype)
    if args.yarn:
        model.enable_yarn(args.yarn)
    return model.eval()


def prompt_ids(model, text_tokens: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.text_config.vocab_size - 2, (1, text_tokens), generator=g)
    ids[0, 8] = model.config.image_token_id
    return ids


def visual_tokens(model, frames: int, device, chunk_clips: int) -> tuple[torch.Tensor, float]:
    """Visual tokens of ``frames`` random frames, encoded in bounded batches; returns them and the time."""
    size = model.config.image_size
    g = torch.Generator().manual_seed(frames)

    def batches():
        step = chunk_clips * model.config.frames_per_clip
        for lo in range(0, frames, step):
            n = min(step, frames - lo)
            yield torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)

    t0 = time.perf_counter()
    embeds = model.encode_video_chunked(batches(), chunk_clips, total_frames=frames)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return embeds, time.perf_counter() - t0


def prefill(model, ids, embeds, frames, schedule):
    """One prefill (cache on, last-token logits) with the dropout ``schedule`` or none."""
    cfg = model.config
    if schedule is None:
        cfg.visual_dropout_in_inference = False
    else:
        cfg.set_visual_dropout(*schedule, inference=True)
    with torch.no_grad():
        out = model(input_ids=ids, video_embeds=embeds, video_frame_counts=torch.tensor([frames]), use_cache=True,
                    logits_to_keep=1)
    cfg.visual_dropout_in_inference = False
    return out


KV_METHODS = ("none", "dropout", "adaretake", "videox2l", "dropout+adaretake")


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def kv_prefill(model, ids, embeds, frames, method, schedule, budget, chunk_frames):
    """One prefill by ``method`` (see KV_METHODS): ``(device KV bytes, host KV bytes)``."""
    dropout = schedule if "dropout" in method else None
    if method in ("none", "dropout"):
        out = prefill(model, ids, embeds, frames, dropout)
        cache = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
        return _cache_bytes(cache), 0
    cfg = model.config
    if dropout is None:
        cfg.visual_dropout_in_inference = False
    else:
        cfg.set_visual_dropout(*dropout, inference=True)
    try:
        policy = make_policy("videox2l" if method == "videox2l" else "adaretake",
                             budget=None if method == "videox2l" else budget, chunk_frames=chunk_frames)
        inp, decoder = videoflash_input(model, ids, embeds, chunk_frames)
        engine = ChunkedPrefillEngine(decoder, policy)
        if isinstance(policy, VideoX2L):
            store = engine.prefill_video(inp)
            engine.answer(store, inp)
            return _cache_bytes(engine.cache), store.host_bytes()
        engine.prefill(inp)
        return _cache_bytes(engine.cache), 0
    finally:
        cfg.visual_dropout_in_inference = False


def run_cpu_kv(args) -> None:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device("cpu")
    model = build_model(args, device, torch.float32)
    schedule = scaled_dropout(model.config.text_config.num_hidden_layers, args.dropout)
    ids = prompt_ids(model)
    tc = model.config.text_config
    tpf = model.config.tokens_per_frame
    # AdaReTaKe keeps all text and r = budget / prompt of the video: a budget of the budget-frames'
    # visual tokens keeps the whole cache (text included) within the uncompressed one at budget-frames
    budget = args.kv_budget or args.budget_frames * tpf
    print(f"# CPU, {torch.get_num_threads()} threads; LLM qwen2 width {tc.hidden_size}, {tc.num_hidden_layers} layers, "
          f"{tpf} visual tokens per frame; AdaReTaKe budget {budget} tokens; chunks of {args.kv_chunk_frames} frames; "
          f"dropout after layers {schedule[0]} keep {schedule[1]} ({schedule[2]})")
    emb, _ = visual_tokens(model, 16, device, args.chunk_clips)
    for method in KV_METHODS:  # warm-up
        kv_prefill(model, ids, emb, 16, method, schedule, budget, args.kv_chunk_frames)
    print(f"{'frames':>7} {'method':>18} {'prefill s':>10} {'cpu s':>8} {'peak MB':>8} {'KV MB':>8} {'host MB':>8}")
    rows = {}
    for frames in args.frames:
        embeds, _ = visual_tokens(model, frames, device, args.chunk_clips)
        for method in KV_METHODS:
            with CpuPeak() as peak:
                t0, c0 = time.perf_counter(), time.process_time()
                kv, host = kv_prefill(model, ids, embeds, frames, method, schedule, budget, args.kv_chunk_frames)
                elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            rows[frames, method] = (elapsed, cpu, max(peak.peak, 0) / 2**20, kv / 2**20, host / 2**20)
            r = rows[frames, method]
            print(f"{frames:>7} {method:>18} {r[0]:>10.2f} {r[1]:>8.2f} {r[2]:>8.1f} {r[3]:>8.2f} {r[4]:>8.2f}",
                  flush=True)
        del embeds
    # the KV cache of the uncompressed prompt at --budget-frames frames, in bytes
    ref = args.budget_frames * tpf + ids.shape[1] - 1
    per_token = tc.num_hidden_layers * 2 * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads) * 4
    limit = ref * per_token / 2**20
    print(f"# ratios against none (prefill CPU time, peak memory, KV cache); KV budget {limit:.2f} MB "
          f"= the uncompressed cache at {args.budget_frames} frames")
    fits = {}
    for method in KV_METHODS:
        ok = [f for f in args.frames if rows[f, method][3] <= limit * 1.0001]
        fits[method] = max(ok) if ok else 0
        top = args.frames[-1]
        b, r = rows[top, "none"], rows[top, method]
        print(f"{method:>18} at {top} frames: cpu {_ratio(r[1], b[1])}  peak memory {_ratio(r[2], b[2])}  "
              f"KV {_ratio(r[3], b[3])}; frames within the KV budget: {fits[method] or 'none of those run'}")
    best = fits["adaretake"]
    bound = ">= " if best == args.frames[-1] else ""
    print(f"frames that fit the KV cache of {args.budget_frames} uncompressed frames: AdaReTaKe {bound}{best} "
          f"(x{bound}{best / args.budget_frames:.2f})")


def run_needle(args) -> None:
    from pathlib import Path

    from videoflash.eval.synthetic import FrameSettings, load_records, normalize_answer, prepare
    from videoflash.model.processing_videoflash import VideoFlashProcessor

    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = VideoFlashForConditionalGeneration.from_pretrained(args.needle).eval()
    tok = VideoFlashProcessor.from_directory(args.needle, config=model.config).tokenizer
    records = [r for r in load_records(args.heldout) if r["task"].startswith("needle")]
    if not records:
        raise SystemExit(f"{args.heldout} holds no needle questions")
    root = Path(args.heldout).parent
    small, large = args.needle_frames
    budget = small * model.config.tokens_per_frame  # the visual tokens that fit
    # Video-X²L within the same budget: chunks of 16 frames, L-KV 1/4, H-KV 1/32, the first, the
    # last and the most relevant chunk in detail
    methods = [
        (f"uncompressed, {small} frames", small, None),
        (f"uncompressed, {large} frames (over budget)", large, None),
        (f"adaretake keep, {large} frames", large, AdaReTaKe(budget, chunk_frames=args.kv_chunk_frames)),
        (f"adaretake reforge, {large} frames", large,
         AdaReTaKe(budget, positions="reforge", chunk_frames=args.kv_chunk_frames)),
        (f"videox2l, {large} frames", large, VideoX2L(alpha_low=4, alpha_high=32, top_k=1, chunk_frames=16)),
    ]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    print(f"# {args.needle}: {len(records)} needle questions of {args.heldout}; visual KV budget {budget} tokens "
          f"({small} frames x {model.config.tokens_per_frame})")
    print(f"{'method':>42} {'visual KV':>10} {'accuracy':>9}  per task")
    scores = {}
    for name, frames, policy in methods:
        tasks: dict[str, list[int]] = {}
        held = []
        for rec in records:
            item = prepare(rec, root, tok, FrameSettings(model.config.image_size, "dynamic_fps1", frames, frames,
                                                         model.config.frames_per_clip))
            ids = torch.tensor([item["input_ids"]])
            embeds = model.encode_video_chunked(item["frames"], 16)
            text = ids.shape[1] - 1
            with torch.no_grad():
                if policy is None:
                    out = model.generate(input_ids=ids, video_embeds=embeds,
                                         video_frame_counts=torch.tensor([item["frames"].shape[0]]), max_new_tokens=8,
                                         do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
                    new = out[0, ids.shape[1]:].tolist()
                    held.append(embeds.shape[0])
                else:
                    inp, decoder = videoflash_input(model, ids, embeds, policy.chunk_frames)
                    engine = ChunkedPrefillEngine(decoder, policy)
                    logits = (engine.answer(engine.prefill_video(inp), inp) if isinstance(policy, VideoX2L)
                              else engine.prefill(inp))
                    layers = range(len(engine.cache.layers))
                    held.append(sum(engine.cache.layer_length(i) - text for i in layers) / len(layers))
                    new = engine.generate(logits, max_new_tokens=8, eos_token_id=eos)
            answer = normalize_answer(tok.decode(new, skip_special_tokens=True))
            tasks.setdefault(rec["task"], []).append(int(answer == normalize_answer(rec["answer"])))
        total = sum(sum(v) for v in tasks.values()) / len(records)
        scores[name] = total
        per_task = "  ".join(f"{k} {sum(v)}/{len(v)}" for k, v in sorted(tasks.items()))
        print(f"{name:>42} {sum(held) / len(held):>10.1f} {total:>9.3f}  {per_task}", flush=True)
    base, keep, reforge = (scores[m[0]] for m in (methods[0], methods[2], methods[3]))
    print(f"needle accuracy at the KV budget of {small} frames, AdaReTaKe with {large} frames / {small} subsampled "
          f"({base:.3f}): keep {_ratio(keep, base)}, reforge {_ratio(reforge, base)}")


def run_cpu(args) -> None:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device("cpu")
    model = build_model(args, device, torch.float32)
    schedule = scaled_dropout(model.config.text_config.num_hidden_layers, args.dropout)
    ids = prompt_ids(model)
    tc = model.config.text_config
    print(f"# CPU, {torch.get_num_threads()} threads; LLM qwen2 width {tc.hidden_size}, {tc.num_hidden_layers} layers, "
          f"{model.config.tokens_per_frame} visual tokens per frame; dropout after layers {schedule[0]} keep "
          f"{schedule[1]} ({schedule[2]})")
    # warm-up (thread pools, kernels)
    emb, _ = visual_tokens(model, 16, device, args.chunk_clips)
    prefill(model, ids, emb, 16, None)
    prefill(model, ids, emb, 16, schedule)
    rows = []
    header = (f"{'frames':>7} {'tokens':>7} {'encode s':>9} {'prefill s':>10} {'+drop s':>8} {'cpu s':>8} "
              f"{'+drop cpu':>9} {'peak MB':>8} {'+drop MB':>9}")
    print(header)
    for frames in args.frames:
        embeds, t_enc = visual_tokens(model, frames, device, args.chunk_clips)
        # interleaved repeats: the fastest time and the highest peak of each setting
        # (wall s, CPU s of this process, peak MB): CPU time is what the prefill costs when other
        # processes share the cores; wall time is what a user waits
        res = {"base": (float("inf"), float("inf"), 0.0), "drop": (float("inf"), float("inf"), 0.0)}
        for rep in range(args.repeat):
            order = (("base", None), ("drop", schedule))
            for name, sched in order if rep % 2 == 0 else order[::-1]:
                with CpuPeak() as peak:
                    t0, c0 = time.perf_counter(), time.process_time()
                    out = prefill(model, ids, embeds, frames, sched)
                    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
                del out
                w, c, m = res[name]
                res[name] = (min(w, elapsed), min(c, cpu), max(m, max(peak.peak, 0) / 2**20))
        tokens = embeds.shape[0] + ids.shape[1] - 1
        rows.append((frames, tokens, t_enc, res))
        b, d = res["base"], res["drop"]
        print(f"{frames:>7} {tokens:>7} {t_enc:>9.2f} {b[0]:>10.2f} {d[0]:>8.2f} {b[1]:>8.2f} {d[1]:>9.2f} "
              f"{b[2]:>8.1f} {d[2]:>9.1f}", flush=True)
        del embeds
    print("# ratios, with dropout / without (prefill wall time, CPU time, peak memory):")
    for frames, tokens, _, res in rows:
        b, d = res["base"], res["drop"]
        print(f"frames {frames:>6}: wall {_ratio(d[0], b[0])}  cpu {_ratio(d[1], b[1])}  peak memory {_ratio(d[2], b[2])}")
    if len(rows) > 1:
        f0, f1 = rows[0][3], rows[-1][3]
        print(f"scaling {rows[0][0]} -> {rows[-1][0]} frames ({rows[-1][0] / rows[0][0]:.0f}x): prefill CPU time "
              f"{_ratio(f1['base'][1], f0['base'][1])} without dropout, {_ratio(f1['drop'][1], f0['drop'][1])} with; "
              f"peak memory {_ratio(f1['base'][2], f0['base'][2])} / {_ratio(f1['drop'][2], f0['drop'][2])}")


def cuda_attempt(frames: int, tokens_per_frame: int, hidden: int, run):
    """``run(embeds)`` on random visual tokens of ``frames`` frames: ``(seconds, peak GiB, *what run
    returns)``, or None when it runs out of memory."""
    device = torch.device("cuda")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        g = torch.Generator(device=device).manual_seed(frames)
        embeds = torch.randn(frames * tokens_per_frame, hidden, device=device, dtype=torch.bfloat16, generator=g) * 0.02
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        extra = run(embeds)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        del embeds
        return (elapsed, torch.cuda.max_memory_allocated() / 2**30, *extra)
    except torch.cuda.OutOfMemoryError:
        return None


def search_frames(attempt, name: str, args, tokens_per_frame: int):
    """Double the frame count from ``--start-frames`` until ``attempt(frames)`` runs out of memory,
    then bisect to ``--resolution`` frames: ``(largest that fits, smallest that failed, its result)``."""
    def show(n, r):
        extra = f", KV {r[2]:.2f} GiB, host {r[3]:.2f} GiB" if r is not None and len(r) > 2 else ""
        print(f"  {name}: {n} frames ({n * tokens_per_frame} tokens): "
              + ("OOM" if r is None else f"{r[0]:.1f} s, {r[1]:.1f} GiB{extra}"), flush=True)

    fits, fails, timing = None, None, None
    n = args.start_frames
    while n <= args.max_frames:
        r = attempt(n)
        show(n, r)
        if r is None:
            fails = n
            break
        fits, timing, n = n, r, n * 2
    while fails is not None and fits is not None and fails - fits > args.resolution:
        mid = (fits + fails) // 2 // 4 * 4
        r = attempt(mid)
        show(mid, r)
        if r is None:
            fails = mid
        else:
            fits, timing = mid, r
    return fits, fails, timing


def cuda_setup(args):
    """The 7B-shaped bf16 model on the GPU and what every CUDA run needs of it: ``(device, model,
    dropout schedule, prompt ids, hidden size, tokens per frame)``."""
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    device = torch.device("cuda")
    model = build_model(args, device, torch.bfloat16)
    schedule = scaled_dropout(model.config.text_config.num_hidden_layers, args.dropout)
    ids = prompt_ids(model).to(device)
    return device, model, schedule, ids, model.config.text_config.hidden_size, model.config.tokens_per_frame


def run_cuda(args) -> None:
    device, model, schedule, ids, hidden, tpf = cuda_setup(args)
    props = torch.cuda.get_device_properties(0)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    print(f"# {props.name}, {props.total_memory / 2**30:.0f} GiB; Qwen2-7B-shaped LLM + UMT-L, bf16, {weights:.1f} GiB "
          f"of weights; {tpf} tokens per frame; dropout after layers {schedule[0]} keep {schedule[1]} ({schedule[2]})"
          + (f"; YaRN x{args.yarn}" if args.yarn else ""))
    # the encoder in bounded chunks: its peak does not depend on the frame count
    torch.cuda.reset_peak_memory_stats()
    _, t_enc = visual_tokens(model, 256, device, args.chunk_clips)
    print(f"# encoder: 256 frames in {t_enc:.2f} s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB "
          f"({args.chunk_clips} clips per call)")

    def attempt(frames, sched):
        def run(embeds):
            prefill(model, ids, embeds, frames, sched)
            return ()

        return cuda_attempt(frames, tpf, hidden, run)

    if not args.search:
        rows = []
        for frames in args.frames:
            r = {name: attempt(frames, sched) for name, sched in (("base", None), ("drop", schedule))}
            rows.append((frames, r))
            fmt = lambda x: "OOM" if x is None else f"{x[0]:.2f} s {x[1]:.1f} GiB"  # noqa: E731
            print(f"{frames:>7} frames: without dropout {fmt(r['base'])}, with {fmt(r['drop'])}", flush=True)
        print("# ratios, with dropout / without (prefill time, peak memory):")
        for frames, r in rows:
            if r["base"] and r["drop"]:
                print(f"frames {frames:>6}: time {_ratio(r['drop'][0], r['base'][0])}  peak memory "
                      f"{_ratio(r['drop'][1], r['base'][1])}")
        return
    results = {name: search_frames(lambda n: attempt(n, sched), name, args, tpf)
               for name, sched in (("no dropout", None), ("dropout", schedule))}
    print("# largest frame count whose prefill fits:")
    for name, (fits, fails, timing) in results.items():
        bound = f"(OOM at {fails})" if fails else f"(no OOM up to --max-frames {args.max_frames})"
        print(f"{name}: {fits} frames {bound}, prefill {timing[0]:.1f} s, peak {timing[1]:.1f} GiB" if fits else
              f"{name}: not even {args.start_frames} frames fit")
    a, b = results["no dropout"][0], results["dropout"][0]
    if a and b:
        print(f"ratio dropout / no dropout: frames that fit x{b / a:.2f}")


def run_cuda_kv(args) -> None:
    """The 7B-shaped search with every method of KV_METHODS (point 7 of issue 10). Not run in this
    project's CI (no GPU); the code shares kv_prefill with the CPU path, which the tests run."""
    device, model, schedule, ids, hidden, tpf = cuda_setup(args)
    budget = args.kv_budget or 16000
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, {props.total_memory / 2**30:.0f} GiB; Qwen2-7B-shaped LLM, bf16; {tpf} tokens per frame; "
          f"AdaReTaKe budget {budget}; chunks of {args.kv_chunk_frames} frames"
          + (f"; YaRN x{args.yarn}" if args.yarn else ""))

    def attempt(frames, method):
        def run(embeds):
            kv, host = kv_prefill(model, ids, embeds, frames, method, schedule, budget, args.kv_chunk_frames)
            return kv / 2**30, host / 2**30

        return cuda_attempt(frames, tpf, hidden, run)

    results = {}
    for method in KV_METHODS:
        if args.search:
            results[method] = search_frames(lambda n: attempt(n, method), method, args, tpf)
            continue
        fits = timing = fails = None
        for n in args.frames:
            r = attempt(n, method)
            print(f"  {method}: {n} frames: " + ("OOM" if r is None else
                  f"{r[0]:.1f} s, peak {r[1]:.1f} GiB, KV {r[2]:.2f} GiB, host {r[3]:.2f} GiB"), flush=True)
            if r is None:
                fails = n
                break
            fits, timing = n, r
        results[method] = (fits, fails, timing)
    print("# largest frame count whose prefill fits:" if args.search else "# the largest frame count run:")
    for method, (fits, fails, timing) in results.items():
        print(f"{method}: {fits} frames" + (f" (OOM at {fails})" if fails else "")
              + (f", prefill {timing[0]:.1f} s, peak {timing[1]:.1f} GiB" if timing else ""))
    a, b = results["none"][0], results["dropout+adaretake"][0]
    if a and b:
        print(f"ratio dropout+adaretake / none: frames that fit x{b / a:.2f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--frames", type=int, nargs="+", default=[64, 256, 1024, 4096], help="frame counts")
    p.add_argument("--width", type=int, default=256, help="CPU: LLM width")
    p.add_argument("--layers", type=int, default=12, help="CPU: LLM layers")
    p.add_argument("--tokens-per-frame", type=int, default=4, help="CPU: visual tokens per frame")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--dropout", default="published-scaled",
                   help="published-scaled (default) | published | 'layer:ratio:kind,...'")
    p.add_argument("--chunk-clips", type=int, default=16, help="clips per encoder call")
    p.add_argument("--yarn", type=float, default=None, help="YaRN factor (contexts beyond 32k positions)")
    p.add_argument("--search", action="store_true", help="CUDA: search the largest frame count that fits")
    p.add_argument("--start-frames", type=int, default=1024)
    p.add_argument("--max-frames", type=int, default=65536)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--repeat", type=int, default=2, help="CPU: prefills per setting (fastest time, highest peak)")
    p.add_argument("--kv", action="store_true", help="compare KV-cache compression methods (see above)")
    p.add_argument("--kv-budget", type=int, default=None, help="AdaReTaKe: tokens of context")
    p.add_argument("--budget-frames", type=int, default=256,
                   help="--kv: the KV budget is the uncompressed cache at this many frames")
    p.add_argument("--kv-chunk-frames", type=int, default=32, help="--kv / --needle: frames per prefill chunk")
    p.add_argument("--needle", metavar="EXPORT", help="needle accuracy of this trained export (see above)")
    p.add_argument("--heldout", default="data/quickstart/heldout.jsonl", help="--needle: held-out questions")
    p.add_argument("--needle-frames", type=int, nargs=2, default=[16, 128], metavar=("SMALL", "LARGE"),
                   help="--needle: frames that fit uncompressed, frames given to the compressed methods")
    args = p.parse_args(argv)
    if args.device == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and argv is None:
        # glibc then returns large blocks to the OS when they are freed, so the resident set follows
        # live memory and its high-water mark is the peak of the measured block
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    for frames in args.frames:
        if frames % 4:
            raise SystemExit(f"frame counts are multiples of 4, got {frames}")
    if args.needle:
        run_needle(args)
    elif args.device == "cuda":
        run_cuda_kv(args) if args.kv else run_cuda(args)
    else:
        run_cpu_kv(args) if args.kv else run_cpu(args)


if __name__ == "__main__":
    main()
