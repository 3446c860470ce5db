"""``python -m videoflash.chat --model DIR --video FILE "question"``: chat about a video with a
VideoFlash checkpoint (streaming, multi-turn); the logic is in :mod:`videoflash.inference.chat_cli`."""

import sys

from videoflash.console import quiet_known_noise
from videoflash.inference.chat_cli import main

if __name__ == "__main__":
    quiet_known_noise()
    sys.exit(main())
