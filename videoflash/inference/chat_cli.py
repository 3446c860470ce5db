"""``python -m videoflash.chat --model DIR --video FILE "question" ["follow-up" ...] [-i]``

Loads a VideoFlash checkpoint (an export of ``python -m videoflash.export`` or a training stage's
``export/`` folder), samples the video with the checkpoint's frame policy, and answers each question
in turn -- a multi-turn conversation about the same video, whose visual tokens are computed once.
Answers stream to stdout token by token (``--no-stream`` prints each when complete); ``-i`` keeps
reading questions from stdin until an empty line or end of input. Long videos: frames are decoded
``--decode-batch-frames`` at a time and encoded ``--max-clips-per-batch`` clips at a time; ``--yarn``
extends the LLM's context; ``--visual-dropout published`` drops visual tokens inside the LLM as
VideoChat-Flash's inference setting (after layer 4 keep 0.75 uniformly, after layer 18 keep 0.25
text-guided). ``--kv-compression adaretake`` prefills the video in chunks of ``--kv-chunk-frames``
frames and keeps each chunk's KV cache to the tokens the question attends to most, within
``--kv-budget`` tokens of context; ``--kv-compression videox2l`` keeps two compressed KVs per chunk
and reloads the chunks relevant to each question in detail (the prefill is shared by the turns).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

DTYPES = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m videoflash.chat", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (export or a stage's export/)")
    media = p.add_mutually_exclusive_group()
    media.add_argument("--video", help="video file")
    media.add_argument("--image", action="append", help="image file (repeat for several images)")
    p.add_argument("questions", nargs="*", help="questions, asked in turn in one conversation")
    p.add_argument("-i", "--interactive", action="store_true", help="then read more questions from stdin")
    p.add_argument("--max-frames", type=int, help="cap on sampled frames (default: the processor's)")
    p.add_argument("--min-frames", type=int, help="floor on sampled frames (default: the processor's)")
    p.add_argument("--start", type=float, help="start of the span to sample (seconds)")
    p.add_argument("--end", type=float, help="end of the span to sample (seconds)")
    p.add_argument("--visual-dropout", metavar="SPEC",
                   help="published | none | 'layer:ratio:kind,...' (default: the checkpoint's config)")
    p.add_argument("--kv-compression", choices=["adaretake", "videox2l"],
                   help="chunked prefill with KV-cache compression (default: none)")
    p.add_argument("--kv-budget", type=int, metavar="TOKENS", help="AdaReTaKe: tokens of context (default 16000)")
    p.add_argument("--kv-chunk-frames", type=int, default=32, metavar="N", help="frames per prefill chunk")
    p.add_argument("--kv-positions", choices=["keep", "reforge"], help="AdaReTaKe: position handling (default keep)")
    p.add_argument("--kv-top-k", type=int, metavar="K", help="Video-X²L: chunks reloaded in detail (default 3)")
    p.add_argument("--kv-max-guide-length", type=int, metavar="N",
                   help="AdaReTaKe: guide each chunk with the last N tokens of the question only")
    p.add_argument("--yarn", type=float, metavar="FACTOR", help="YaRN rope scaling factor for long contexts")
    p.add_argument("--yarn-original", type=int, metavar="N", help="native context for YaRN (default: the LLM's)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="> 0 samples; 0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES))
    p.add_argument("--attn", default=None, help="attention implementation (sdpa, eager, flash_attention_2)")
    p.add_argument("--max-clips-per-batch", type=int, default=16, help="clips per encoder call")
    p.add_argument("--decode-batch-frames", type=int, default=64, help="frames decoded at a time")
    p.add_argument("--no-stream", action="store_true", help="print each answer when complete")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the checkpoint's own code (AutoModel) instead of this repo's model code")
    p.add_argument("--stats", action="store_true", help="report frames, tokens and timings on stderr")
    p.add_argument("--json", action="store_true", help="print the conversation as JSON at the end")
    return p


def load(model_dir: str, device: str = "auto", dtype: str = "auto", attn: str | None = None,
         trust_remote_code: bool = False, **policy):
    """(model, processor) of a checkpoint directory; ``policy`` overrides processor fields."""
    from videoflash.model.modeling_videoflash import VideoFlashForConditionalGeneration
    from videoflash.model.processing_videoflash import VideoFlashProcessor

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json")
    kwargs = {"dtype": DTYPES[dtype]}
    if attn:
        kwargs["attn_implementation"] = attn
    if trust_remote_code:
        from transformers import AutoModel, AutoProcessor

        model = AutoModel.from_pretrained(path, trust_remote_code=True, **kwargs)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    else:
        model = VideoFlashForConditionalGeneration.from_pretrained(path, **kwargs)
        processor = VideoFlashProcessor.from_directory(path, config=model.config)
    for key, value in policy.items():
        if value is not None:
            setattr(processor, key, value)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    return model, processor


def main(argv: list[str] | None = None, stdin=None, stdout=None) -> int:
    from transformers import TextStreamer

    args = build_parser().parse_args(argv)
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if not args.questions and not args.interactive:
        print("give a question (or -i to type them)", file=sys.stderr)
        return 2
    media = args.video or args.image
    if media is None:
        print("note: no --video or --image; answering from text alone", file=sys.stderr)
    try:
        model, processor = load(args.model, args.device, args.dtype, args.attn, args.trust_remote_code,
                                system_prompt=args.system)
    except (OSError, ValueError) as exn:
        print(f"cannot load {args.model}: {exn}", file=sys.stderr)
        return 1
    if args.yarn:
        params = model.enable_yarn(args.yarn, args.yarn_original)
        print(f"YaRN on: factor {params['factor']} over {params['original_max_position_embeddings']} positions",
              file=sys.stderr)

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            stdout.write(text + ("\n" if stream_end else ""))
            stdout.flush()

    gen = {"max_new_tokens": args.max_new_tokens}
    if args.temperature > 0:
        gen.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    else:
        gen.update(do_sample=False)
    history: list[dict] = []
    kv = {}
    if args.kv_compression:
        options = {"chunk_frames": args.kv_chunk_frames}
        if args.kv_positions:
            options["positions"] = args.kv_positions
        if args.kv_top_k is not None:
            options["top_k"] = args.kv_top_k
        if args.kv_max_guide_length is not None:
            options["max_guide_length"] = args.kv_max_guide_length
        kv = {"kv_compression": args.kv_compression, "kv_budget": args.kv_budget, "kv_options": options}

    def questions():
        yield from args.questions
        if args.interactive:
            while True:
                if stdin.isatty():
                    print(">>> ", end="", file=sys.stderr, flush=True)
                line = stdin.readline()
                if not line or not line.strip():
                    return
                yield line.strip()

    for question in questions():
        streamer = None if args.no_stream else _Streamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        t0 = time.perf_counter()
        try:
            answer, history = model.chat(
                args.video, question, processor=processor, history=history, max_frames=args.max_frames,
                min_frames=args.min_frames, start=args.start, end=args.end,
                images=args.image if args.image else None, return_history=True,
                visual_dropout=args.visual_dropout, streamer=streamer,
                max_clips_per_batch=args.max_clips_per_batch, decode_batch_frames=args.decode_batch_frames,
                **kv, **gen,
            )
        except (FileNotFoundError, ValueError) as exn:
            print(f"error: {exn}", file=sys.stderr)
            return 1
        if streamer is None:
            stdout.write(answer + "\n")
            stdout.flush()
        if args.stats:
            cache = getattr(model, "_videoflash_visual_cache", None)
            frames = cache[2].num_sampled if cache else 0
            tokens = cache[1].shape[0] if cache else 0
            kept = ""
            engine = getattr(model, "_videoflash_kv_engine", None) if kv else None
            if engine is not None:
                lengths = [engine.cache.layer_length(i) for i in range(len(engine.cache.layers))]
                kept = f"; KV cache {min(lengths)}..{max(lengths)} tokens per layer ({args.kv_compression})"
            print(f"[{time.perf_counter() - t0:.2f} s; {frames} frames, {tokens} visual tokens{kept}]", file=sys.stderr)
    if args.json:
        stdout.write(json.dumps(history, ensure_ascii=False) + "\n")
    return 0
