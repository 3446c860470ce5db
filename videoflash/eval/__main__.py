"""``python -m videoflash.eval <export dir> --heldout <heldout.jsonl>``; the logic is in ``cli``."""

from videoflash.eval.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
