"""The MoE-PHDS study (arXiv 2509.23012) and the RoE study (arXiv 2509.17238) as a package.

Run its command lines from the repository root, e.g. `python -m experiments.run_all --scale=tiny`. Modules:
settings (the one `Settings` object every step reads), data (tasks, splits, the seed's files), runs (the
runs and their configs), local (the tiny study on this machine), pod (phds-launch commands), collect (pod
evaluations into the tiny study's files), study (the command line), stats and summarize (RESULTS.md).
"""
