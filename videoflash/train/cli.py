"""The command line: ``python -m videoflash.train stage=3 model=tiny stage.lr=2e-5 resume=auto``.

1. ``stage=N`` is mapped to the Hydra group option ``stage=stageN`` (``videoflash.config``).
2. Hydra composes ``configs/train.yaml`` over the typed schema: unknown keys and wrong types stop
   here with the key named (exit status 1, Hydra's message).
3. :func:`videoflash.config.validate` checks values, and :func:`videoflash.config.check_paths` the
   files the run starts from (``resume=<dir>``, ``stage.init``, pretrained paths): exit status 2,
   ``config error: <key>: <path> ...``.
4. Only then are torch / DeepSpeed / the model touched: the trainer runs the stage and the process
   exits with its status (0 done, 75 preempted after a checkpoint: resume with ``resume=auto``).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from videoflash.console import quiet_known_noise
from videoflash.config import CONFIG_DIR, CONFIG_NAME, ConfigError, check_paths, normalize_overrides, validate

EXIT_CONFIG_ERROR = 2


@hydra.main(config_path=str(CONFIG_DIR), config_name=CONFIG_NAME, version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        typed = validate(cfg)
        check_paths(typed)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    from videoflash.train.trainer import run  # heavy imports start here

    sys.exit(run(cfg, typed, argv=sys.argv[1:]))


def main() -> None:
    quiet_known_noise()
    sys.argv[1:] = normalize_overrides(sys.argv[1:])
    _hydra_main()
