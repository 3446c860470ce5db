"""Command line of the held-out synthetic evaluation (see ``synthetic``)."""

from __future__ import annotations

import argparse
import json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m videoflash.eval", description="Held-out synthetic answer accuracy.")
    p.add_argument("export", help="an HF export directory (e.g. runs/quickstart/stage4/export)")
    p.add_argument("--heldout", required=True, help="heldout.jsonl of data_tools.synth_videos")
    p.add_argument("--policy", default="dynamic_fps1", help="frame policy: middle | dynamic_fps1 | fps:<rate>")
    p.add_argument("--min-frames", type=int, default=4)
    p.add_argument("--max-frames", type=int, default=8)
    p.add_argument("--image-size", type=int, default=None, help="frames and encoder at this size (default: the export's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the scores (and every prediction) here")
    a = p.parse_args(argv)

    from videoflash.model.configuration_videoflash import VideoFlashConfig  # noqa: F401  (registers the type)

    from .synthetic import FrameSettings, evaluate_export

    cfg = VideoFlashConfig.from_pretrained(a.export)
    fs = FrameSettings(image_size=a.image_size or cfg.image_size, policy=a.policy, min_frames=a.min_frames,
                       max_frames=a.max_frames, frames_per_clip=cfg.frames_per_clip, max_grid=cfg.max_grid)
    result = evaluate_export(a.export, a.heldout, fs, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens,
                             max_samples=a.max_samples)
    print(result.table())
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**result.to_dict(), "predictions": result.predictions}, f, indent=2)
    return 0
