"""Storage URLs, WebDataset shard streams and DataModules."""

from sdtune.data.classification import ClassificationDataModule
from sdtune.data.datamodule import ShardDataModule

__all__ = ["ClassificationDataModule", "ShardDataModule"]
