"""``python -m din_kernels train ...`` / ``python -m din_kernels compare RUN...``."""

import sys

from .train import main

if __name__ == "__main__":
    sys.exit(main())
