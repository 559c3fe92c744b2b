"""Storage URLs, WebDataset shard streams and DataModules."""

from sdtune.data.datamodule import ShardDataModule

__all__ = ["ShardDataModule"]
