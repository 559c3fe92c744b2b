"""Training side effects: EMA, sample grids, data statistics."""
