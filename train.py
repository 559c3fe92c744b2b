"""sdtune entry point: `python train.py fit --config configs/quickstart.yaml [--resume auto]` (= `sdtune fit ...`)."""

import sys

from sdtune.command import main

if __name__ == "__main__":
    sys.exit(main())
