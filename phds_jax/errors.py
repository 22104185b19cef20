"""Exceptions raised by phds_jax. Each message names the file, tensor or argument at fault."""


class PhdsError(Exception):
  """Base class of every phds_jax error."""


class ConfigError(PhdsError, ValueError):
  """A model configuration (config.json or ModelConfig) is malformed or inconsistent."""


class ConfigProblems(ConfigError):
  """A run's config has mistakes found before any work started; `problems` lists them, one line each."""

  def __init__(self, source: str, problems: list[str]):
    self.problems = list(problems)
    listed = "\n".join(f"  - {p}" for p in self.problems)
    super().__init__(f"{source}: {len(self.problems)} problem(s) to fix before anything runs:\n{listed}")


class PathError(PhdsError, ValueError):
  """A path the user gave cannot be used (a bucket, a model id that cannot be resolved); names the field."""


class UnsupportedModelError(ConfigError):
  """The checkpoint's `model_type` or one of its options is not implemented here."""


class CheckpointError(PhdsError, ValueError):
  """A weight file set does not match the model it claims to hold."""


class MissingTensorError(CheckpointError):
  """A tensor the model needs is absent from the checkpoint."""


class UnexpectedTensorError(CheckpointError):
  """The checkpoint holds tensors the model does not use."""


class ShapeMismatchError(CheckpointError):
  """A tensor's shape differs from what the model config implies."""


class MissingShardError(CheckpointError, FileNotFoundError):
  """A weight file named by the index (or expected in the directory) does not exist."""


class WorkdirMismatchError(CheckpointError):
  """A training workdir holds another run (other model or incompatible settings); it is never resumed into."""


class TrainingDivergedError(PhdsError, FloatingPointError):
  """A training step produced a non-finite loss or gradient (train.on_nan="stop")."""


class UnsafeWeightsError(CheckpointError):
  """Pickle-based weights (`.bin`, `.pt`) were found and the caller did not opt in to loading them."""


class PlanDoesNotFitError(PhdsError):
  """An ahead-of-time plan (compile_topology) does not fit the slice's HBM, or cannot be made."""
