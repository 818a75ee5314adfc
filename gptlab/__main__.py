"""Entry point for `python -m gptlab`, the form that `torchrun -m gptlab STAGE ...` needs."""

import sys

from gptlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
