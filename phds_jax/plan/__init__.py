"""Ahead-of-time plans: compile the real programs for a TPU slice on any machine and read their cost."""
