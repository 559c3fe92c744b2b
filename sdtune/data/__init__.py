"""Storage URLs, WebDataset shard streams and the shard DataModule.

`ShardDataModule` is imported on first use, so tools that only write shards (`data_tools make_shards`) do
not load torch, Lightning or diffusers through this package."""

from typing import Any

__all__ = ["ShardDataModule"]


def __getattr__(name: str) -> Any:
    if name == "ShardDataModule":
        from sdtune.data.datamodule import ShardDataModule

        return ShardDataModule
    raise AttributeError(f"module 'sdtune.data' has no attribute {name!r}")
