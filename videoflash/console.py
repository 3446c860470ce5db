"""What the console shows: known third-party noise is filtered once, here, by name.

Every ``python -m videoflash.*`` entry point calls :func:`quiet_known_noise` first. Each filter names
the exact message and says where it comes from; anything else still reaches the console. A filter
belongs here only when the noise cannot be fixed at its source (our own deprecated calls are fixed
where they are made, not filtered).
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["quiet_known_noise", "KNOWN_NOISE"]

#: (category, message regex, where it comes from)
KNOWN_NOISE = (
    # DeepSpeed 0.19's ZeRO-3 gathers and reduce-scatters parameters through these torch.distributed
    # names, which torch 2.14 deprecated: two warnings per training step, nothing a user can change.
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated", "deepspeed zero3"),
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated", "deepspeed zero3"),
)


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


_installed = False


def quiet_known_noise() -> None:
    """Install the filters of :data:`KNOWN_NOISE` (idempotent)."""
    global _installed
    if _installed:
        return
    for category, message, _ in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    # torch's extension builder logs this once per process when DeepSpeed JIT-builds its CPU op on a
    # machine without CUDA: expected there, and not an error.
    logging.getLogger("torch.utils.cpp_extension").addFilter(_DropMessage("No CUDA runtime is found"))
    _installed = True
