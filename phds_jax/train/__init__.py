"""Training: the sharded step and loop, the k schedule, metrics, the built-in end-to-end run."""
