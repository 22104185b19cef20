"""Evaluation and inference: scoring, generation, latency, the eval and sweep jobs, lm-eval."""
