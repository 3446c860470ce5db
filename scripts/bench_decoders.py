"""The video backends on the same frames, one core each: frames/s of the data room's decoder.

    python scripts/bench_decoders.py [--num-videos 8] [--resolution 640x360] [--repeats 3]

The corpus is scripts/bench_loader.py's (synthetic long videos, 64-512 s at 2 fps, cached under
``--workdir``); each video's frames are those ``dynamic_fps1`` in [64, 512] picks, as the loader
takes them. In this one process (torch at one thread, decoders at one thread), for each backend
``videoflash.data.decode.VideoDecoder(bytes, size=--image-size, backend=...).frames(indices)``:

- ``decord``: decord2 scales to the target size in its filter graph while it decodes;
- ``torchcodec``: full-size frames at the exact indices, then torch's uint8 bicubic antialias resize;
- ``pyav``: every frame decoded up to the last one asked for, the kept ones resized like torchcodec's;

plus ``--full-size`` rows (each backend's decoding alone, at the source size). Before timing, the
backends' frames are compared: torchcodec and PyAV must be equal, decord within a few grey levels
(the resizes differ). Each backend runs ``--repeats`` times, interleaved, and the best time counts
(the machine may be shared). The last line is the fastest backend's rate against decord's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_loader import MAX_FRAMES, MIN_FRAMES, corpus_arguments, decode_sampled, prepare  # noqa: E402
from videoflash.data.decode import VideoDecoder  # noqa: E402
from videoflash.data.sampling import frame_indices  # noqa: E402
from videoflash.model.video_io import torchcodec_problem  # noqa: E402

BACKENDS = ("decord", "torchcodec", "pyav")


def decode_all(datas: list[bytes], size, backend: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = sum(decode_sampled(data, size, backend) for data in datas)
    return time.perf_counter() - t0, n


def check_same_frames(data: bytes, size: int, backends) -> str:
    """Decode one video's frames with every backend; equal full-size frames, close resized ones."""
    outs = {}
    for b in backends:
        dec = VideoDecoder(data, size=None, backend=b)
        idx = frame_indices(dec.num_frames, dec.fps, "dynamic_fps1", MIN_FRAMES, MAX_FRAMES)[::16]
        outs[b] = (idx, dec.frames(idx), VideoDecoder(data, size=size, backend=b).frames(idx))
    ref = outs[backends[0]]
    notes = []
    for b in backends[1:]:
        idx, full, small = outs[b]
        if idx != ref[0]:
            raise SystemExit(f"{b} picks other frames than {backends[0]}: {idx[:5]} vs {ref[0][:5]}")
        if not torch.equal(full, ref[1]):
            raise SystemExit(f"{b} decodes other full-size pixels than {backends[0]}")
        diff = (small.int() - ref[2].int()).abs().float().mean().item()
        notes.append(f"{b} vs {backends[0]}: full size equal, {size} px mean |diff| {diff:.3f}")
    return "; ".join(notes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    corpus_arguments(p)  # here --workers only builds the corpus (not timed)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, decord first")
    p.add_argument("--full-size", action="store_true", help="also time each backend at the source size")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    backends = [b for b in args.backends.split(",") if b]
    if "torchcodec" in backends and torchcodec_problem():
        print(f"skipping torchcodec: {torchcodec_problem()}")
        backends.remove("torchcodec")
    if not backends or backends[0] != "decord":
        p.error("--backends must start with decord (the baseline)")
    paths, _ = prepare(args)
    datas = []
    for path in paths:
        with open(path, "rb") as f:
            datas.append(f.read())
    print(check_same_frames(datas[0], args.image_size, backends), flush=True)
    runs = [(b, args.image_size) for b in backends]
    if args.full_size:
        runs += [(b, None) for b in backends]
    best: dict[tuple[str, int | None], float] = {}
    frames = None
    for r in range(args.repeats):
        for b, size in runs:
            t, n = decode_all(datas, size, b)
            if frames is not None and n != frames:
                raise SystemExit(f"{b} decoded {n} frames, not {frames}")
            frames = n
            best[(b, size)] = min(best.get((b, size), t), t)
            print(f"repeat {r + 1}: {b} @ {size or 'full'}: {t:.2f}s", flush=True)
    import decord

    versions = {"decord": getattr(decord, "__version__", "?")}
    try:
        import torchcodec

        versions["torchcodec"] = torchcodec.__version__
    except Exception:  # noqa: BLE001
        pass
    import av

    versions["pyav"] = av.__version__
    versions["torch"] = torch.__version__
    print(f"videos: {len(datas)} ({frames} frames, {args.resolution} source), one core, "
          + ", ".join(f"{k} {v}" for k, v in versions.items()))  # fmt: skip
    for (b, size), t in best.items():
        print(f"{b:>10} @ {str(size or 'full'):>4}: {frames / t:8.1f} frames/s per core")
    base = best[("decord", args.image_size)]
    fastest = min(backends, key=lambda b: best[(b, args.image_size)])
    t = best[(fastest, args.image_size)]
    print(f"fastest at {args.image_size} px: {fastest} {frames / t:.1f} frames/s, decord {frames / base:.1f} "
          f"frames/s: ratio {base / t:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
