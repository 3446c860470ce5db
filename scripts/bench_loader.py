"""Stage-3-like loading: the shard loader against the reference decoding path, in one run.

    python scripts/bench_loader.py [--num-videos 8] [--workers 2] [--resolution 640x360] [--video-backend auto]

Both sides load the same synthetic long videos (``data_tools.synth_videos``: 64-512 s at 2 fps, so
``dynamic_fps1`` in [64, 512] takes 64-512 frames each) with the same frame indices, the same
DataLoader worker count and one video per batch (stage 3's per-GPU batch):

- **shards** (``videoflash.data``): WebDataset tar shards, the mp4 bytes decoded at 224x224 by
  ``--video-backend`` (``auto``: torchcodec full-size frames + torch's uint8 bicubic when torchcodec
  loads, else decord scaling while it decodes), in each stream's decode child process (the default
  ``decode_isolation``; ``inline`` with ``--decode-isolation inline``), uint8 frames, plus
  tokenizing the conversation and collating the batch;
- **reference** (VideoChat-Flash / LLaVA's path): decord reads the mp4 file at full size, then every
  frame is resized to 224x224 with Pillow's bicubic filter and normalised to float32 in the worker
  (what ``image_processor.preprocess`` does), shipped as float ``[N, 3, 224, 224]``.

- **decode only**: the loader's decoder alone on the same frames (``VideoDecoder`` of the same backend
  on the same files, the same frame indices, the same number of DataLoader workers; nothing else:
  no shards, no decode child, no tokenizer, no collation, no frames shipped back). The loader's
  share of it (issue 12 point 6 wants >= 80%) is what the loader costs on top of decoding.

Each side runs ``--repeats`` times, alternating, and the best time counts (the machine may be
shared). The line before the last prints the decode-only rate and the loader's share of it; the last
line prints both rates (reference, shards) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_tools.make_shards import ShardJob, build_shard_set, shard_pattern  # noqa: E402
from data_tools.synth_videos import SynthConfig, generate_corpus  # noqa: E402
from videoflash.data import DataSource, LoaderConfig, build_loader  # noqa: E402
from videoflash.data.decode import VideoDecoder  # noqa: E402
from videoflash.data.sampling import frame_indices  # noqa: E402
from videoflash.model.video_io import resolve_backend  # noqa: E402
from videoflash.data.tokenizer import build_chatml_tokenizer  # noqa: E402

MIN_FRAMES, MAX_FRAMES = 64, 512
MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # UMT / ImageNet normalisation
STD = np.array([0.229, 0.224, 0.225], np.float32)


class ReferenceVideos(torch.utils.data.Dataset):
    """The reference path: full-size decord read, per-frame bicubic resize, float normalisation."""

    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import decord
        from PIL import Image

        vr = decord.VideoReader(self.paths[i], num_threads=1)
        idx = frame_indices(len(vr), vr.get_avg_fps(), "dynamic_fps1", MIN_FRAMES, MAX_FRAMES)
        frames = vr.get_batch(idx).asnumpy()
        out = np.empty((len(frames), 3, self.size, self.size), np.float32)
        for k, f in enumerate(frames):
            im = Image.fromarray(f).resize((self.size, self.size), Image.BICUBIC)
            x = np.asarray(im, dtype=np.float32) / 255.0
            out[k] = ((x - MEAN) / STD).transpose(2, 0, 1)
        return {"pixel_values": torch.from_numpy(out), "key": os.path.basename(self.paths[i])}


def decode_sampled(data: bytes, size: int | None, backend: str) -> int:
    """The loader's decoding of one video's bytes alone: the frames ``dynamic_fps1`` in
    [MIN_FRAMES, MAX_FRAMES] picks, by ``backend`` at ``size`` (None: full size); the frame count."""
    dec = VideoDecoder(data, size=size, backend=backend)
    idx = frame_indices(dec.num_frames, dec.fps, "dynamic_fps1", MIN_FRAMES, MAX_FRAMES)
    return int(dec.frames(idx).shape[0])


def corpus_arguments(p: argparse.ArgumentParser) -> None:
    """The options :func:`prepare` reads (the cached synthetic corpus), shared with bench_decoders."""
    p.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "videoflash_bench"))
    p.add_argument("--num-videos", type=int, default=8)
    p.add_argument("--resolution", default="640x360", help="WxH of the synthetic videos")
    p.add_argument("--fps", type=float, default=2.0, help="frame rate of the synthetic videos")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--image-size", type=int, default=224)


class DecodeOnly(torch.utils.data.Dataset):
    """The loader's decoder alone: the frames the loader takes from each file, decoded the same way
    (backend, size, indices); only the frame count comes back."""

    def __init__(self, paths: list[str], size: int, backend: str):
        self.paths, self.size, self.backend = paths, size, backend

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with open(self.paths[i], "rb") as f:
            return decode_sampled(f.read(), self.size, self.backend)


def run_decode_only(paths, args) -> tuple[float, int]:
    dl = torch.utils.data.DataLoader(
        DecodeOnly(paths, args.image_size, args.video_backend), batch_size=None, shuffle=False,
        num_workers=args.workers,
    )  # fmt: skip
    t0 = time.perf_counter()
    frames = sum(int(n) for n in dl)
    return time.perf_counter() - t0, frames


def prepare(args) -> tuple[list[str], str]:
    """The corpus (cached under --workdir) and its shards, one video per shard."""
    w, h = (int(x) for x in args.resolution.lower().split("x"))
    corpus = os.path.join(args.workdir, f"corpus_{args.num_videos}_{w}x{h}_{args.fps}")
    if not os.path.exists(os.path.join(corpus, "train.jsonl")):
        cfg = SynthConfig(
            num_train=args.num_videos,
            num_heldout=0,
            long_fraction=1.0,
            seed=0,
            width=w,
            height=h,
            long_fps=args.fps,
            long_duration=(float(MIN_FRAMES), float(MAX_FRAMES)),
            needle_seconds=4.0,
        )
        generate_corpus(corpus, cfg, workers=args.workers)
    shards = os.path.join(corpus, "shards")
    job = ShardJob(
        annotations=[os.path.join(corpus, "train.jsonl")],
        media_root=corpus,
        out_dir=shards,
        prefix="long",
        max_samples=1,
        workers=args.workers,
    )
    index = build_shard_set(job)
    with open(os.path.join(corpus, "train.jsonl")) as f:
        paths = [os.path.join(corpus, json.loads(line)["video"]) for line in f]
    return paths, shard_pattern(shards, "long", index["num_shards"])


def run_reference(paths, args) -> tuple[float, int, list]:
    dl = torch.utils.data.DataLoader(
        ReferenceVideos(paths, args.image_size), batch_size=None, shuffle=False, num_workers=args.workers
    )
    t0 = time.perf_counter()
    frames, keys = 0, []
    for item in dl:
        frames += int(item["pixel_values"].shape[0])
        keys.append(item["key"])
    return time.perf_counter() - t0, frames, keys


def run_shards(pattern, tokenizer, n, args) -> tuple[float, int, list]:
    cfg = LoaderConfig(
        sources=[DataSource(pattern)],
        image_size=args.image_size,
        frame_policy="dynamic_fps1",
        min_frames=MIN_FRAMES,
        max_frames=MAX_FRAMES,
        tokens_per_frame=16,
        tokens_per_image=64,
        max_tokens_per_batch=MAX_FRAMES * 16 + 1024,
        max_batch_size=1,
        batches_per_epoch=n,
        num_workers=args.workers,
        shuffle_buffer=1,
        seed=0,
        decode_isolation=args.decode_isolation,
        video_backend=args.video_backend,
    )
    loader = build_loader(cfg, tokenizer)
    t0 = time.perf_counter()
    frames, keys = 0, []
    for batch in loader:
        assert batch["pixel_values_videos"].dtype == torch.uint8
        frames += int(batch["pixel_values_videos"].shape[0])
        keys += batch["keys"]
    return time.perf_counter() - t0, frames, keys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    corpus_arguments(p)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--decode-isolation", choices=["subprocess", "inline"], default="subprocess",
                   help="the loader's video decoding: in a child process per stream (default) or inline")  # fmt: skip
    p.add_argument("--video-backend", choices=["auto", "torchcodec", "decord", "pyav"], default="auto",
                   help="the loader's decoder (auto: torchcodec when it loads, else decord)")
    args = p.parse_args(argv)
    if args.num_videos % max(1, args.workers):
        p.error("--num-videos must be a multiple of --workers (each worker reads whole shards)")
    torch.set_num_threads(1)
    paths, pattern = prepare(args)
    tokenizer = build_chatml_tokenizer()
    backend = resolve_backend(args.video_backend)
    ref_best = ours_best = dec_best = None
    for r in range(args.repeats):
        t_ref, f_ref, k_ref = run_reference(paths, args)
        t_ours, f_ours, k_ours = run_shards(pattern, tokenizer, len(paths), args)
        t_dec, f_dec = run_decode_only(paths, args)
        print(f"repeat {r + 1}: reference {t_ref:.2f}s ({f_ref} frames), shards {t_ours:.2f}s ({f_ours} frames), "
              f"decode only {t_dec:.2f}s ({f_dec} frames)", flush=True)  # fmt: skip
        if not f_ref == f_ours == f_dec or len(k_ref) != len(k_ours):
            raise SystemExit(f"the sides did not load the same frames: {f_ref} vs {f_ours} vs {f_dec}")
        ref_best = t_ref if ref_best is None else min(ref_best, t_ref)
        ours_best = t_ours if ours_best is None else min(ours_best, t_ours)
        dec_best = t_dec if dec_best is None else min(dec_best, t_dec)
    n, frames = len(paths), f_ref
    print(
        f"videos: {n} ({frames} frames, {frames / n:.0f} per video, {args.resolution} source, "
        f"{args.image_size} px out), workers: {args.workers}, decode: {args.decode_isolation}, "
        f"backend: {backend}, cpus: {os.cpu_count()}"
    )
    print(
        f"decode only ({backend}): {frames / dec_best:.1f} frames/s | "
        f"the loader's share of it: {100 * dec_best / ours_best:.0f}%"
    )
    print(
        f"reference: {n / ref_best:.3f} samples/s {frames / ref_best:.1f} frames/s | "
        f"shards: {n / ours_best:.3f} samples/s {frames / ours_best:.1f} frames/s | "
        f"ratio {ref_best / ours_best:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
