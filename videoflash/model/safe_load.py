"""Torch pickles loaded as data, never as code.

A ``.pt`` file is a pickle: unpickled without restriction it can call any Python function while it
loads (a crafted ``__reduce__`` is enough). Every ``torch.load`` of videoflash goes through
:func:`load_torch_file`, which

1. lists the globals the file's pickle names, without running it
   (``torch.serialization.get_unsafe_globals_in_checkpoint`` reads the opcodes of a zip checkpoint),
   and refuses the file when one of them is neither a type torch's restricted unpickler accepts
   (tensors, storages, plain containers, numbers, strings) nor on the caller's short allow-list;
2. loads it with ``weights_only=True`` under ``torch.serialization.safe_globals(allow-list)``, which
   also guards files in torch's old non-zip format that step 1 cannot read.

The error names the file and the offending globals and says how to opt in. Opting in
(``trust_pickle=True``) is per call, i.e. per file, and is the only way to an unrestricted
``weights_only=False`` load.

This file imports only torch and the standard library: it ships inside every exported checkpoint.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any, Iterable

import torch
from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

__all__ = ["CorruptFileError", "UnsafePickleError", "global_name", "load_torch_file", "unsafe_globals"]


class UnsafePickleError(pickle.UnpicklingError):
    """A torch file names globals outside the allow-list; nothing of it was run."""

    def __init__(self, path: str | os.PathLike, names: list[str], opt_in: str):
        self.path = os.fspath(path)
        self.names = names
        super().__init__(
            f"{self.path}: refusing to unpickle {', '.join(names)}: a weights or checkpoint file should "
            "hold tensors and plain containers only, and these globals could run code while it loads. "
            f"Only if you trust this file, opt in with {opt_in}."
        )


class CorruptFileError(ValueError):
    """A torch file that cannot be read: truncated, or not written by ``torch.save``."""


def global_name(obj: Any) -> str:
    """``module.qualname`` of a class or function, as a pickle names it."""
    return f"{obj.__module__}.{obj.__qualname__}"


def unsafe_globals(path: str | os.PathLike, allowed: Iterable[str] = ()) -> list[str] | None:
    """Globals of the zip checkpoint at ``path`` outside torch's safe set and ``allowed`` (names);
    None for a file in torch's old non-zip format, which cannot be inspected this way."""
    try:
        found = get_unsafe_globals_in_checkpoint(path)
    except ValueError:  # not a zip checkpoint
        return None
    allowed = set(allowed)
    return [name for name in found if name not in allowed]


def load_torch_file(
    path: str | os.PathLike,
    *,
    allowed: Iterable[Any] = (),
    trust_pickle: bool = False,
    opt_in: str = "trust_pickle=True",
    map_location: Any = "cpu",
) -> Any:
    """``torch.load`` of ``path`` that never runs code from the file unless ``trust_pickle``.

    Args:
        allowed: classes or functions the file may name besides torch's safe types (for example
            ``argparse.Namespace`` in training checkpoints that store their arguments).
        trust_pickle: the caller's explicit opt-in for this file: unrestricted ``weights_only=False``.
        opt_in: how the user opts in, for the error message (an argument or a config key).
    """
    if trust_pickle:
        return torch.load(path, map_location=map_location, weights_only=False)
    allowed = list(allowed)
    try:
        bad = unsafe_globals(path, map(global_name, allowed))
        if bad:
            raise UnsafePickleError(path, bad, opt_in)
        with safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        named = re.findall(r"GLOBAL (\S+)", str(err))  # the old format: torch's restricted unpickler caught it
        if isinstance(err, UnsafePickleError):
            raise
        if not named:
            raise CorruptFileError(f"{os.fspath(path)} is not a torch file that can be read: {err}") from err
        raise UnsafePickleError(path, named, opt_in) from None
    except (RuntimeError, EOFError) as err:  # torch's zip reader: truncated or not a torch file at all
        raise CorruptFileError(f"{os.fspath(path)} is not a complete torch file (truncated or corrupt): "
                               f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
