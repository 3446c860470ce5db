"""Frame-index policies (``dynamic_fps1``, ``middle``, ``fps``): see :mod:`videoflash.model.frame_sampling`.

The rule is defined once, in the self-contained model package, because the exported processor must
sample frames exactly as training did; the data room uses it from there (docs/contracts.md).
"""

from videoflash.model.frame_sampling import (  # noqa: F401
    POLICIES,
    FramePolicy,
    frame_count,
    frame_indices,
    middle_indices,
    parse_policy,
    span_to_frames,
)
