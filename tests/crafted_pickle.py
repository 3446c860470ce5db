"""A torch file whose pickle runs code when it is unpickled without restriction.

``Marker`` pickles as a call of ``open(<marker path>, "w")`` (``io.open``): an unrestricted unpickler
(``weights_only=False``) creates the marker file while loading; a loader that treats files as data
refuses the global and the marker never appears.
"""

from __future__ import annotations

from pathlib import Path

import torch


class Marker:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def save_with_payload(obj: dict, path: Path, marker: Path, legacy: bool = False) -> Path:
    """``torch.save`` of ``obj`` plus a ``"payload"`` entry that creates ``marker`` when unpickled."""
    torch.save({**obj, "payload": Marker(marker)}, path, _use_new_zipfile_serialization=not legacy)
    return path
