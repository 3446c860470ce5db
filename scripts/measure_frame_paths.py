"""How far decode-time scaling is from the exact frame path (full-size decode + bicubic).

    python scripts/measure_frame_paths.py [--size 224] [--clips 4]

Writes real mp4 clips into a temporary directory -- synthetic-corpus clips (data_tools.synth_videos)
rendered at 640x360, and one 1280x720 clip of fine texture, the worst case -- and decodes the same
frames twice through the processor: ``resize="decode"`` (decord scales while decoding; what training
uses) and ``resize="exact"`` (the released model's path). Prints the mean and 99th-percentile
absolute difference in 8-bit levels per clip; the last line is the largest mean over the synthetic
clips, the figure docs/model.md quotes as the tolerance.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's videoflash


def _clips(out: Path, count: int) -> list[tuple[str, Path]]:
    from data_tools.media import write_mp4
    from data_tools.synth_videos import SHORT_TASKS, SynthConfig, render_short

    cfg = SynthConfig(width=640, height=360, short_fps=8.0, short_seconds=8)
    clips = []
    for i in range(count):
        spec = {"task": SHORT_TASKS[i % len(SHORT_TASKS)], "seed": [0, 0, 0, i]}
        frames, _ = render_short(spec, cfg)
        path = out / f"synth_{i}.mp4"
        write_mp4(str(path), frames, cfg.short_fps)
        clips.append((f"synthetic {spec['task']} 640x360", path))
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (32, 180, 320, 3), dtype=np.uint8)
    texture = base.repeat(4, axis=1).repeat(4, axis=2)  # 4x4-pixel detail at 1280x720
    path = out / "texture_720p.mp4"
    write_mp4(str(path), texture, 8.0)
    clips.append(("fine texture 1280x720", path))
    return clips


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="square frame side (224 or 448)")
    parser.add_argument("--clips", type=int, default=4, help="synthetic clips")
    args = parser.parse_args(argv)

    from videoflash.data.tokenizer import build_chatml_tokenizer
    from videoflash.model.processing_videoflash import VideoFlashProcessor

    tok = build_chatml_tokenizer()
    fast = VideoFlashProcessor(tok, image_size=args.size, min_frames=4, max_frames=16)
    exact = VideoFlashProcessor(tok, image_size=args.size, min_frames=4, max_frames=16, resize="exact")
    synthetic_means = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in _clips(Path(tmp), args.clips):
            a, meta = fast.load_video(str(path))
            b, meta_b = exact.load_video(str(path))
            assert meta.indices == meta_b.indices
            diff = (a.float() - b.float()).abs().flatten().numpy()
            mean, p99 = float(diff.mean()), float(np.percentile(diff, 99))
            print(f"{name:<40} {len(meta.indices):3d} frames at {args.size}px: mean {mean:.2f}, p99 {p99:.0f} levels")
            if name.startswith("synthetic"):
                synthetic_means.append(mean)
    print(f"largest mean difference over synthetic clips at {args.size}px: {max(synthetic_means):.2f} levels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
