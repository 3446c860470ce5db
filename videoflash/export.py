"""``python -m videoflash.export <run dir or checkpoint> <out dir> [--push <repo_id>] [--private]``:
write (and optionally upload) a Hugging Face model repo; the logic is in
:mod:`videoflash.inference.export`."""

import sys

from videoflash.console import quiet_known_noise
from videoflash.inference.export import main

if __name__ == "__main__":
    quiet_known_noise()
    sys.exit(main())
