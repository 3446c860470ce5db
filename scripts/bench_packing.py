"""Packed rows against padded micro-batches: the same samples, the same model, training steps.

    python scripts/bench_packing.py [--num-samples 96] [--pack-tokens 2048] [--repeats 3]

The synthetic mix (``data_tools.synth_videos``: short clips, a share of long videos with a needle,
images) is sharded once, and the real loader reads it twice with the same seed, hence the same
samples in the same order:

- **padded** (``data.pack_tokens`` off): micro-batches of ``--batch`` samples (default: the mean
  number of samples per packed row, so both sides run about as many forwards), right-padded to the
  longest; ``--batch 1`` is the stage 2-4 recipe's one sample per forward;
- **packed** (``data.pack_tokens``): rows of at most ``--pack-tokens`` tokens, one row per forward.

Each side runs forward + backward of the tiny CPU model (``configs/model/tiny.yaml``, fp32; the
``packed_varlen`` attention that training with packing selects: SDPA sample by sample for packed
rows, plain SDPA with the padding mask for padded batches) over every batch, ``--repeats`` times alternating; the
best time counts (the machine may be shared). The padding share is the LLM positions that hold no
token (after the visual tokens are spliced in) over all positions run. The last line prints both
token rates and their ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_tools.make_shards import ShardJob, build_shard_set, shard_pattern  # noqa: E402
from data_tools.synth_videos import SynthConfig, generate_corpus  # noqa: E402
from videoflash.data import DataSource, LoaderConfig, build_loader  # noqa: E402
from videoflash.data.collate import PACKED_BATCH_KEYS  # noqa: E402
from videoflash.data.tokenizer import build_chatml_tokenizer, ensure_image_token  # noqa: E402
from videoflash.model.configuration_videoflash import VideoFlashConfig  # noqa: E402
from videoflash.model.modeling_videoflash import VideoFlashForConditionalGeneration  # noqa: E402

MODEL_KEYS = PACKED_BATCH_KEYS[:9]


def prepare(args) -> str:
    corpus = os.path.join(args.workdir, f"packmix_{args.num_samples}")
    if not os.path.exists(os.path.join(corpus, "train.jsonl")):
        cfg = SynthConfig(num_train=args.num_samples, num_heldout=0, long_fraction=0.25, images=args.num_samples // 8,
                          long_duration=(20.0, 40.0), seed=0)  # fmt: skip
        generate_corpus(corpus, cfg, workers=1, progress=False)
    shards = os.path.join(corpus, "shards")
    index = build_shard_set(ShardJob(annotations=[os.path.join(corpus, "train.jsonl")], media_root=corpus,
                                     out_dir=shards, prefix="train", max_samples=32, workers=1))  # fmt: skip
    return shard_pattern(shards, "train", index["num_shards"])


def tiny_model(tokenizer, args):
    text = dict(model_type="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, rope_theta=10000.0,
                vocab_size=len(tokenizer), tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    config = VideoFlashConfig(
        vision_config=dict(width=64, depth=2, num_heads=4, image_size=64, patch_size=16, frames_per_clip=4),
        text_config=text, tokens_per_clip=64, tokens_per_image=16, max_grid=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )  # fmt: skip
    torch.manual_seed(0)
    model = VideoFlashForConditionalGeneration(config)
    model.set_attn_implementation(args.attn)
    return model.train()


def batches(pattern, tokenizer, args, pack: int | None, batch: int) -> list[dict]:
    """The loader's batches over the first ``--num-samples`` samples of the stream (the packed side
    stops at the row that reaches that count)."""
    cfg = LoaderConfig(
        sources=[DataSource(pattern)], image_size=64, frame_policy="dynamic_fps1", min_frames=args.min_frames,
        max_frames=args.max_frames, tokens_per_frame=16, tokens_per_image=16, image_mode="anyres",
        max_image_grid=2, max_tokens_per_batch=10**9, max_sample_tokens=args.pack_tokens,
        max_batch_size=batch, batches_per_epoch=args.num_samples, num_workers=0, shuffle_buffer=64, seed=0,
        pack_tokens=pack, pack_rows=1, decode_isolation="inline",
    )  # fmt: skip
    out, seen = [], 0
    for b in build_loader(cfg, tokenizer):
        out.append(b)
        seen += len(b["keys"])
        if seen >= args.num_samples:
            break
    return out


def positions(b) -> tuple[int, int]:
    """(real tokens, LLM positions run) of a batch after splicing."""
    lengths = (b["num_text_tokens"] + b["num_visual_tokens"]).tolist()
    real = sum(lengths)
    if "sample_lengths" in b:
        return real, real  # one flat sequence per micro-batch, no padding inside the model
    return real, len(lengths) * max(lengths)


def run(model, data) -> float:
    t0 = time.perf_counter()
    for b in data:
        model.zero_grad(set_to_none=True)
        out = model(**{k: b[k] for k in MODEL_KEYS if k in b})
        out.loss.backward()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "videoflash_bench"))
    p.add_argument("--num-samples", type=int, default=96)
    p.add_argument("--pack-tokens", type=int, default=2048)
    p.add_argument("--batch", type=int, default=0, help="padded samples per micro-batch (0: as many as a packed row holds on average)")
    p.add_argument("--min-frames", type=int, default=4)
    p.add_argument("--max-frames", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--attn", default="packed_varlen", choices=["packed_varlen", "sdpa"],
                   help="packed_varlen: what training with packing uses (SDPA sample by sample on CPU; "
                        "unpacked batches: plain SDPA); sdpa: one dense block-diagonal mask per packed row")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pattern = prepare(args)
    tokenizer = build_chatml_tokenizer()
    ensure_image_token(tokenizer)
    packed = batches(pattern, tokenizer, args, args.pack_tokens, 1)
    keys = [k for b in packed for k in b["keys"]][: args.num_samples]
    per_row = len(keys) / len(packed)
    bsz = args.batch or max(1, round(per_row))
    padded = batches(pattern, tokenizer, args, None, bsz)
    if [k for b in padded for k in b["keys"]][: len(keys)] != keys:
        raise SystemExit("the two sides did not read the same samples in the same order")
    model = tiny_model(tokenizer, args)
    stats = {}
    for name, data in (("padded", padded), ("packed", packed)):
        real, run_pos = map(sum, zip(*(positions(b) for b in data)))
        stats[name] = dict(real=real, positions=run_pos, forwards=len(data), samples=sum(len(b["keys"]) for b in data))
        run(model, data[:1])  # warm-up
    best = {}
    for r in range(args.repeats):
        for name, data in (("padded", padded), ("packed", packed)):
            t = run(model, data)
            best[name] = min(best.get(name, t), t)
        print(f"repeat {r + 1}: padded {best['padded']:.2f}s, packed {best['packed']:.2f}s (best so far)", flush=True)
    for name in ("padded", "packed"):
        s = stats[name]
        print(f"{name}: {s['samples']} samples in {s['forwards']} forwards, {s['real']} tokens in {s['positions']} "
              f"positions (padding {1 - s['real'] / s['positions']:.1%}), {s['real'] / best[name]:.0f} tokens/s")  # fmt: skip
    print(f"mix: {args.num_samples} samples, frames {args.min_frames}-{args.max_frames}, rows of {args.pack_tokens} "
          f"tokens ({per_row:.1f} samples per row), padded batch {bsz}, attention {args.attn}, threads {args.threads}, "
          f"cpus {os.cpu_count()}")  # fmt: skip
    rate = {n: stats[n]["real"] / best[n] for n in best}
    print(f"padded: {rate['padded']:.0f} tokens/s (padding {1 - stats['padded']['real'] / stats['padded']['positions']:.1%}) | "
          f"packed: {rate['packed']:.0f} tokens/s (padding 0.0%) | ratio {rate['packed'] / rate['padded']:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
