"""sdtune entry point: `python train.py fit --config configs/quickstart.yaml [--resume auto]`."""

from sdtune.cli import main

if __name__ == "__main__":
    main()
