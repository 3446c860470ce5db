"""Resume cost and read amplification of the loader's raw stream, on real tar shards.

    python scripts/bench_resume.py [--samples 4000] [--sample-kb 64] [--workers 2] [--out /tmp/bench_resume]

Writes a shard set of text samples, each carrying ``--sample-kb`` of payload (an extra tar member the
text path ignores, so that bytes matter and decoding does not), with its compact index and offsets
files, then measures:

- **resume**: a loader is run to 10 % (and, separately, 90 %) of an epoch, its state goes through
  JSON, a new loader loads it, and the time to its first batch and the shard bytes read for it are
  taken. A loader that replays the epoch would need about 9x longer at 90 %; this one recomputes one
  shuffle window per stream and reads only the samples of that batch.
- **read amplification**: shard bytes read / bytes of the samples used, the worst rank, at 16 streams
  over 8 shards and at 256 streams over 64 shards (one in-process stream per rank).

The last line prints the 90 %/10 % ratio of the time to the first batch (about 1 means constant cost)
and both amplifications.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from videoflash.data import DataSource, LoaderConfig, build_loader  # noqa: E402
from videoflash.data.shards import INDEX_FORMAT, index_name, shard_name, write_offsets  # noqa: E402
from videoflash.data.tokenizer import build_chatml_tokenizer  # noqa: E402


def write_set(out: str, prefix: str, shards: int, per_shard: int, payload: int) -> str:
    """``shards`` tar shards of text samples with ``payload`` extra bytes each; returns the pattern."""
    import webdataset as wds

    os.makedirs(out, exist_ok=True)
    rows = []
    for i in range(shards):
        path = os.path.join(out, shard_name(prefix, i))
        with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as sink:
            for k in range(per_shard):
                key = f"{prefix}{i}_{k}"
                rec = {"id": key, "media_type": "text", "conversations": [
                    {"from": "human", "value": f"What is sample {key}?"}, {"from": "gpt", "value": "red"}]}  # fmt: skip
                sink.write({"__key__": key, "json": json.dumps(rec).encode(), "bin": os.urandom(payload)})
        write_offsets(path)
        rows.append({"name": shard_name(prefix, i), "num_samples": per_shard, "bytes": os.path.getsize(path)})
    index = {"format": INDEX_FORMAT, "prefix": prefix, "num_shards": shards, "shards": rows,
             "total": shards * per_shard, "rejects": 0}  # fmt: skip
    with open(os.path.join(out, index_name(prefix)), "w") as f:
        json.dump(index, f)
    return os.path.join(out, f"{prefix}-{{000000..{shards - 1:06d}}}.tar")


def config(pattern: str, **kw) -> LoaderConfig:
    base = dict(sources=[DataSource(pattern)], image_size=32, max_frames=16, tokens_per_frame=2, tokens_per_image=3,
                max_tokens_per_batch=100_000, max_batch_size=8, unit_samples=8, shuffle_buffer=64, seed=0)  # fmt: skip
    base.update(kw)
    return LoaderConfig(**base)


def resume_cost(pattern: str, samples: int, workers: int, fraction: float, tok) -> tuple[float, int]:
    """(seconds to the first batch after resuming at ``fraction`` of an epoch, shard bytes read for it)."""
    cfg = config(pattern, num_workers=workers, batches_per_epoch=samples // 8)
    first = build_loader(cfg, tok)
    cut = int(len(first) * fraction)
    for n, _ in enumerate(first, 1):
        if n == cut:
            break
    state = json.loads(json.dumps(first.state_dict()))
    del first
    t0 = time.perf_counter()
    second = build_loader(cfg, tok)
    second.load_state_dict(state)
    next(iter(second))
    return time.perf_counter() - t0, second.read_stats()["bytes_read"]


def amplification(pattern: str, streams: int, batches: int, tok) -> float:
    """The worst rank's shard bytes read / bytes used, one in-process stream per rank."""
    worst = 0.0
    for rank in range(streams):
        loader = build_loader(config(pattern, num_workers=0, batches_per_epoch=batches), tok, rank, streams)
        for _ in loader:
            pass
        worst = max(worst, loader.read_stats()["amplification"])
    return worst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=4000, help="samples in the resume set (8 shards)")
    p.add_argument("--sample-kb", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="best of this many resumes at each point")
    p.add_argument("--out", default="/tmp/bench_resume")
    a = p.parse_args()
    tok = build_chatml_tokenizer()
    payload = a.sample_kb * 1024
    big = write_set(os.path.join(a.out, "resume"), "res", 8, a.samples // 8, payload)
    times = {}
    for fraction in (0.1, 0.9):
        runs = [resume_cost(big, a.samples // 8 * 8, a.workers, fraction, tok) for _ in range(a.repeats)]
        times[fraction] = min(r[0] for r in runs)
        print(f"resume at {fraction:.0%} of an epoch of {a.samples} samples ({a.samples * a.sample_kb / 1024:.0f} MB): "
              f"first batch after {times[fraction]:.3f} s, {runs[0][1] / 1e6:.2f} MB read for it")  # fmt: skip
    small = write_set(os.path.join(a.out, "eight"), "eight", 8, 32, payload // 8)
    amp16 = amplification(small, 16, 2, tok)  # 16 streams x 2 batches of 8 = the 256 samples once
    wide = write_set(os.path.join(a.out, "wide"), "wide", 64, 32, payload // 64)
    amp256 = amplification(wide, 256, 1, tok)  # 256 streams x 1 batch of 8 = the 2048 samples once
    print(f"read amplification (shard bytes read / bytes of the samples used, worst rank): "
          f"16 streams over 8 shards {amp16:.3f}, 256 streams over 64 shards {amp256:.3f}")  # fmt: skip
    print(f"resume 90%/10% time to first batch: {times[0.9] / times[0.1]:.2f}x "
          f"({times[0.9]:.3f} s / {times[0.1]:.3f} s); read amplification 16/8: {amp16:.3f}x, 256/64: {amp256:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
