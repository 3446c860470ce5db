"""``python -m videoflash.eval <export dir> --heldout <heldout.jsonl>``; the logic is in ``cli``."""

from videoflash.console import quiet_known_noise
from videoflash.eval.cli import main

if __name__ == "__main__":
    quiet_known_noise()
    raise SystemExit(main())
