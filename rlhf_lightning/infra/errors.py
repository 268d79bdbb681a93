"""The exceptions the CLI turns into one line (`cli_main`), by what the user can do about them.

- `ConfigError`: a user mistake (bad argument, missing file). `cli_main` prints its message as one line and exits
  with status 2; any other exception is a bug and keeps its traceback.
- `TrainingFailure`: a failure once training runs that the user can act on: `RewardFunctionError` (a reward
  function raised, returned the wrong number of values or a non-finite reward) and `NonFiniteError` (a loss,
  gradient or weight that is NaN/inf); `cli_main` prints one line naming the cause (status 1).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user error in the configuration or the inputs: shown as one line, without a traceback."""


class TrainingFailure(RuntimeError):
    """A failure once training runs, shown by the CLI as one line after `error.ckpt` is written (exit status 1).
    `save_checkpoint = False` for failures whose state is not worth resuming (non-finite weights)."""

    save_checkpoint = True


class RewardFunctionError(TrainingFailure):
    """A reward function failed (raised, returned the wrong number of values, a non-number or a non-finite one)."""


class NonFiniteError(TrainingFailure):
    """A loss, gradient, weight or logit is NaN/inf: the message names which and what to do."""


class NonFiniteWeightsError(NonFiniteError):
    """The weights themselves are non-finite: no `error.ckpt` (it could not be resumed usefully)."""

    save_checkpoint = False
