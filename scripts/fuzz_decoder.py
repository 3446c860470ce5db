"""Find video files that crash or hang the native decoder, by flipping bytes of a real small mp4.

    python scripts/fuzz_decoder.py --out /tmp/crashers [--tries 2000] [--flips 8] [--timeout 5] [--backend decord]

The seed is a small real H.264 mp4 written with PyAV (``--seed-file`` takes another). Each candidate
is the seed with ``--flips`` random bytes replaced (seeded by ``--seed`` and the try number, so a run
can be repeated). A forked child decodes it the way the data room does
(``videoflash.data.decode.VideoDecoder`` with ``--backend``, decord by default: the kept crashers of
tests/data are decord's; then ``frames`` spread over the video and its last frame,
as make_shards' probe and the loader do); Python exceptions are the normal outcome of a damaged file
and count as "rejected". A child that dies by a signal (SIGSEGV, SIGABRT, SIGFPE, SIGBUS ...) or runs
past ``--timeout`` is a finding: its bytes are written to ``--out`` as
``{signal or hang}-{stage}-{try}.mp4``, the stage being the step the child was in (``open``: the
container and decoder set-up; ``frames``: decoding). The last line prints how many candidates were
tried and how each ended.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import random
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def seed_video() -> bytes:
    """A 24-frame 48x48 H.264 mp4 with moving content (a few KB)."""
    import numpy as np

    from data_tools.media import encode_mp4

    n, size = 24, 48
    yy, xx = np.mgrid[0:size, 0:size]
    frames = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        frames[i, ..., 0] = (xx * 5 + i * 9) % 256
        frames[i, ..., 1] = (yy * 5 + i * 3) % 256
        frames[i, ..., 2] = ((xx + yy) * 3 + i * 7) % 256
    return encode_mp4(frames, 8.0, crf=30, gop=8)


def decode_like_the_data_room(data: bytes, stage, backend: str = "decord") -> None:
    """What make_shards' probe and the loader run on a video's bytes; ``stage(name)`` is called before
    each step, so that a crash can be told apart by where it happened (``open`` or ``frames``)."""
    from videoflash.data.decode import VideoDecoder

    stage("open")
    dec = VideoDecoder(data, size=32, backend=backend)
    stage("frames")
    dec.frames(range(0, dec.num_frames, max(1, dec.num_frames // 8)))
    dec.frames([dec.num_frames - 1])


def mutate(seed: bytes, rng: random.Random, flips: int, skip: int) -> bytes:
    data = bytearray(seed)
    for _ in range(flips):
        data[rng.randrange(skip, len(data))] = rng.randrange(256)
    return bytes(data)


def run_one(data: bytes, timeout: float, backend: str = "decord") -> tuple[str, str]:
    """``(outcome, stage)`` of decoding ``data`` in a forked child: outcome ``ok`` | ``rejected`` |
    ``hang`` | a signal name; stage the last step the child began (``open`` | ``frames``)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into the parent's code
        os.close(r)
        code = 0
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)  # ffmpeg's complaints about the damage
            faulthandler.disable()  # a crash is the expected outcome here, not worth a traceback
            decode_like_the_data_room(data, lambda name: os.write(w, name.encode() + b"\n"), backend)
        except Exception:
            code = 3
        os._exit(code)
    os.close(w)
    deadline = time.monotonic() + timeout
    outcome = None
    while outcome is None:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status):
                outcome = signal.Signals(os.WTERMSIG(status)).name
            else:
                outcome = "ok" if os.WEXITSTATUS(status) == 0 else "rejected"
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            outcome = "hang"
        else:
            time.sleep(0.002)
    with os.fdopen(r, "rb") as f:
        stages = f.read().split()
    return outcome, stages[-1].decode() if stages else "start"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the crashing / hanging files")
    p.add_argument("--seed-file", default=None, help="the mp4 to mutate (default: a small synthetic one)")
    p.add_argument("--tries", type=int, default=2000)
    p.add_argument("--flips", type=int, default=8, help="bytes replaced per candidate")
    p.add_argument("--skip", type=int, default=32, help="leave the first bytes (ftyp) alone")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds before a child counts as hung")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=int, default=20, help="stop after this many findings")
    p.add_argument("--backend", choices=["decord", "torchcodec", "pyav"], default="decord", help="the decoder fuzzed")
    a = p.parse_args(argv)
    if a.seed_file:
        with open(a.seed_file, "rb") as f:
            seed = f.read()
    else:
        seed = seed_video()
    import decord  # noqa: F401  (imported once here, so that every forked child starts warm)

    from videoflash.data.decode import decodable_width
    from videoflash.model.video_io import resolve_backend

    resolve_backend(a.backend)  # fails here if it cannot load; warms torchcodec's check
    decodable_width(32)  # warm the width check's cache in the parent as well
    os.makedirs(a.out, exist_ok=True)
    counts: dict[str, int] = {}
    found = 0
    t0 = time.time()
    for t in range(a.tries):
        data = mutate(seed, random.Random(f"{a.seed}:{t}"), a.flips, a.skip)
        got, stage = run_one(data, a.timeout, a.backend)
        counts[got] = counts.get(got, 0) + 1
        if got not in ("ok", "rejected"):
            path = os.path.join(a.out, f"{got.lower()}-{stage}-{t}.mp4")
            with open(path, "wb") as f:
                f.write(data)
            found += 1
            print(f"try {t}: {got} in {stage} -> {path}", flush=True)
            if found >= a.keep:
                break
    tried = sum(counts.values())
    print(
        f"seed {len(seed)} bytes, {tried} candidates in {time.time() - t0:.1f}s: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + f"; findings {found}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
