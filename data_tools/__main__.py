"""`python -m data_tools <command> --help`: synth, make_shards."""

from jsonargparse import auto_cli

from data_tools.make_shards import make_shards
from data_tools.synth import synth


def main() -> None:
    auto_cli([synth, make_shards], as_positional=False)


if __name__ == "__main__":
    main()
