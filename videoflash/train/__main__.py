"""``python -m videoflash.train stage=N [overrides]``: the entry point; the logic is in ``cli``."""

from videoflash.train.cli import main

if __name__ == "__main__":
    main()
