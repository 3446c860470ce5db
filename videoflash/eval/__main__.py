"""``python -m videoflash.eval <export dir> --heldout <heldout.jsonl>`` (the synthetic held-out
evaluation, ``cli``) or ``python -m videoflash.eval bench=<name> data=<dir> model=<export dir>``
(the offline benchmark runner, ``runner``)."""

import sys

from videoflash.console import quiet_known_noise

if __name__ == "__main__":
    quiet_known_noise()
    if any(a.startswith("bench=") for a in sys.argv[1:]):
        from videoflash.eval.runner import main
    else:
        from videoflash.eval.cli import main
    raise SystemExit(main())
