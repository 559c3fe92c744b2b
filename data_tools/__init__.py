"""Dataset tools: synthetic data, shard building (more come with later issues)."""
