"""Checkpoint layout, manifest, writing and finding the newest complete checkpoint."""
