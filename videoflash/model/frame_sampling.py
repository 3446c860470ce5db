"""Frame-index policies: which frames of a video a training sample decodes.

Three policies, all returning a multiple of ``local_num_frames`` (4: one UMT clip) indices and all
honouring an optional ``start``/``end`` span in seconds:

``dynamic_fps1`` (stages 2-4), VideoChat-Flash's rule (reference videochat_flash.md section 3.2)::

    duration = vlen / fps
    n = 4 * floor(duration / 4)          # about 1 fps, rounded down to a multiple of 4
    if n == 0: n = 4
    n = min(n, max_frames)               # frames_upbound
    if min_frames > vlen: min_frames = 4 * floor(vlen / 4)
    n = max(n, min_frames)               # frames_lowbound

``fps`` (``"fps:2"`` or ``policy="fps", target_fps=2``): the same rule with ``duration * target_fps``
in place of ``duration``; ``fps:1`` is ``dynamic_fps1``.

``middle`` (stage 1): a fixed count, ``max_frames`` (``frames_upbound``; 4 in stage 1).

The ``n`` frames are then picked by "middle" uniform sampling: the span is cut into ``n`` intervals by
``linspace(0, vlen, n + 1)`` truncated to integers, the midpoint ``(a + b - 1) // 2`` of each interval
is taken, and when the span has fewer than ``n`` frames every frame is taken once and the list is
padded with the last one.

This module lives in the model package because the exported processor samples frames with the same
rule as training (export copies videoflash/model into every checkpoint); the data room re-exports it
as ``videoflash.data.sampling``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "FramePolicy",
    "parse_policy",
    "frame_count",
    "middle_indices",
    "span_to_frames",
    "frame_indices",
    "POLICIES",
]

POLICIES = ("dynamic_fps1", "fps", "middle")


@dataclass(frozen=True)
class FramePolicy:
    """A parsed policy: ``name`` in :data:`POLICIES` and, for ``fps``, the target rate."""

    name: str
    target_fps: float = 1.0


def parse_policy(policy: str | FramePolicy, target_fps: float | None = None) -> FramePolicy:
    """Parse ``"dynamic_fps1"``, ``"middle"``, ``"fps"`` or ``"fps:<rate>"`` into a :class:`FramePolicy`."""
    if isinstance(policy, FramePolicy):
        return policy
    name = str(policy).strip()
    rate = 1.0 if target_fps is None else float(target_fps)
    if name.startswith("fps:"):
        rate = float(name.split(":", 1)[1])
        name = "fps"
    if name not in POLICIES:
        raise ValueError(f"unknown frame policy {policy!r}; expected one of {POLICIES} or 'fps:<rate>'")
    if name == "dynamic_fps1":
        rate = 1.0
    if not rate > 0:
        raise ValueError(f"frame policy {policy!r}: the target fps must be positive, got {rate}")
    return FramePolicy(name, rate)


def frame_count(
    vlen: int,
    fps: float,
    policy: str | FramePolicy = "dynamic_fps1",
    min_frames: int = 1,
    max_frames: int = 512,
    *,
    target_fps: float | None = None,
    local_num_frames: int = 4,
) -> int:
    """How many frames the policy takes from a span of ``vlen`` frames at ``fps`` (see module doc)."""
    pol = parse_policy(policy, target_fps)
    k = int(local_num_frames)
    if vlen < 1:
        raise ValueError(f"a video needs at least one frame, got {vlen}")
    if pol.name == "middle":
        n = int(max_frames)
    else:
        if not fps or not fps > 0:
            raise ValueError(f"policy {pol.name!r} needs a positive fps, got {fps!r}")
        duration = vlen / float(fps)
        n = k * math.floor(duration * pol.target_fps / k)
        if n == 0:
            n = k
        n = min(n, int(max_frames))
        low = int(min_frames)
        if low > vlen:
            low = k * math.floor(vlen / k)
        n = max(n, low)
    if n < 1 or n % k:
        raise ValueError(
            f"policy {pol.name!r} gives {n} frames, which is not a positive multiple of {k}; "
            f"check min_frames={min_frames} and max_frames={max_frames}"
        )
    return n


def middle_indices(vlen: int, n: int) -> list[int]:
    """Midpoints of ``n`` equal intervals of ``range(vlen)``, padded with the last one to length ``n``."""
    if vlen < 1 or n < 1:
        raise ValueError(f"need vlen >= 1 and n >= 1, got vlen={vlen}, n={n}")
    acc = min(n, vlen)
    bounds = np.linspace(0, vlen, acc + 1).astype(int)
    idx = [int((bounds[i] + bounds[i + 1] - 1) // 2) for i in range(acc)]
    idx += [idx[-1]] * (n - acc)
    return idx


def span_to_frames(
    num_frames: int, fps: float, start: float | None = None, end: float | None = None
) -> tuple[int, int]:
    """The frame range ``[first, stop)`` of the ``start``/``end`` span (seconds; either may be None).

    ``first = round(start * fps)`` and ``stop = round(end * fps)``, clamped to the video; an empty or
    inverted span, or a start past the end, is an error (the sample is bad, not silently the whole
    video or its last frame).
    """
    first, stop = 0, int(num_frames)
    if start is None and end is None:
        return first, stop
    if not fps or not fps > 0:
        raise ValueError(f"a start/end span needs a positive fps, got {fps!r}")
    if start is not None:
        first = max(0, int(round(float(start) * fps)))
        if first >= num_frames:  # a wrong annotation: counted as bad, never a one-frame clip
            raise ValueError(f"start={start} s is past the end of a {num_frames}-frame video at {fps} fps")
    if end is not None:
        stop = min(num_frames, int(round(float(end) * fps)))
    if stop <= first:
        raise ValueError(
            f"empty span: start={start} end={end} gives frames [{first}, {stop}) of a {num_frames}-frame video"
        )
    return first, stop


def frame_indices(
    num_frames: int,
    fps: float,
    policy: str | FramePolicy = "dynamic_fps1",
    min_frames: int = 1,
    max_frames: int = 512,
    *,
    start: float | None = None,
    end: float | None = None,
    target_fps: float | None = None,
    local_num_frames: int = 4,
) -> list[int]:
    """Frame indices (into the whole video) that a sample of this video decodes.

    Args:
        num_frames: frames in the whole video.
        fps: its average frame rate.
        policy: ``"dynamic_fps1"``, ``"middle"``, ``"fps"`` / ``"fps:<rate>"``.
        min_frames, max_frames: the stage's ``frames_lowbound`` / ``frames_upbound``; ``middle`` takes
            exactly ``max_frames``.
        start, end: optional span in seconds; sampling is restricted to it.
        target_fps: the rate of the ``fps`` policy (when not given as ``"fps:<rate>"``).
        local_num_frames: frames per clip; the count is a multiple of it.

    Returns:
        ``n`` indices in ``[0, num_frames)``, non-decreasing, ``n`` a multiple of ``local_num_frames``.
    """
    first, stop = span_to_frames(num_frames, fps, start, end)
    vlen = stop - first
    n = frame_count(
        vlen, fps, policy, min_frames, max_frames, target_fps=target_fps, local_num_frames=local_num_frames
    )
    return [first + i for i in middle_indices(vlen, n)]
