"""The quality gate: evaluation windows, metrics against the reference, the budget,
per-layer sensitivity."""
