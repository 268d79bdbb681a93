"""The algorithms' pure math, looked up by name (see `advantages` for the advantage-estimator registry)."""
