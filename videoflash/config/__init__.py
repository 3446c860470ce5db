"""Typed configuration: the schema (``schema.py``), validation (``validate.py``) and composition.

``python -m videoflash.train stage=3 ...`` and :func:`compose` go through the same steps:
:func:`normalize_overrides` turns the ``stage=N`` that users type into Hydra's group option
``stage=stageN`` (a Hydra group option must be a string), Hydra composes ``configs/train.yaml`` over
the schema, and :func:`validate` checks the values.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig

from .schema import VideoFlashSchema, register  # noqa: F401  (registers the schema)
from .validate import ConfigError, resolve, validate  # noqa: F401
from .files import check_paths, hf_dir_problems  # noqa: F401

#: ``configs/`` at the repository root.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIG_NAME = "train"

_STAGE_ARG = re.compile(r"^stage=(\d+)$")


def normalize_overrides(args: Iterable[str]) -> list[str]:
    """Map ``stage=N`` (N an integer) to the group option ``stage=stageN``; keep everything else.

    ``stage=stage3`` and the Hydra-quoted ``stage='3'`` are not touched (the latter selects a file
    named ``3.yaml``, which does not exist, and Hydra says so with the list of options).
    """
    out = []
    for arg in args:
        match = _STAGE_ARG.match(arg)
        out.append(f"stage=stage{int(match.group(1))}" if match else arg)
    return out


def compose(overrides: Iterable[str] = (), check: bool = True) -> DictConfig:
    """Compose ``configs/train.yaml`` with command-line style overrides (``stage=3``, ``model=tiny``).

    Raises Hydra's / OmegaConf's errors for unknown keys and wrong types, and :class:`ConfigError`
    from :func:`validate` when ``check`` is true.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=CONFIG_NAME, overrides=normalize_overrides(overrides))
    if check:
        validate(cfg)
    return cfg
