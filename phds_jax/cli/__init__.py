"""The command line: the base config and its checks, the mode registry, launchers, process start-up."""
