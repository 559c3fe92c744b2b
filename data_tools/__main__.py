"""`python -m data_tools <command> --help`: synth, digits, make_shards, encode_latents, upload, verify, subsets."""

import logging

from jsonargparse import auto_cli

from data_tools.digits import digits
from data_tools.encode_latents import encode_latents
from data_tools.make_shards import make_shards
from data_tools.remote import upload, verify
from data_tools.subsets import subsets
from data_tools.synth import synth


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    auto_cli([synth, digits, make_shards, encode_latents, upload, verify, subsets], as_positional=False)


if __name__ == "__main__":
    main()
