"""Running a benchmark: the configuration, the runner, run records and their provenance, checkpoints and
weights, grids and sweeps, W&B logging, and ``metabench verify`` / ``test --weights``."""
