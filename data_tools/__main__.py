"""`python -m data_tools <command> --help` (= `sdtune data <command>`): synth, digits, make_shards,
encode_latents, upload, verify, subsets; `make_shards` and `make-shards` are the same command."""

import sys

from sdtune.command import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if args and not args[0].startswith("-"):
        args[0] = args[0].replace("_", "-")
    sys.exit(main(["data", *args]))
