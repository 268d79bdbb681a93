"""The environment protocol: what a multi-turn task implements so the rollout loop can play an episode with it.

One environment object plays ONE episode (one completion): the loop builds a fresh one per rollout row with the
class (or factory) named in `environment:`, calls `reset(row)` once, then `step(turn)` after every policy turn
(a turn ends at EOS; a turn that ends at a tool call is answered by the tool instead). The loop stops a row when
`step` says `done`, at `max_turns`, or at the token budget.

    reset(row)   -> str      the first message, appended after the prompt before the policy's first turn ("" none)
    step(turn)   -> EnvStep  the observation to append (attended, not trained on), this turn's reward, done

`row` is the dataset row of the prompt: {"prompt": ..., <every other column>: ...}. The rewards of the steps
reach the reward functions as the `env_rewards` column (one list per completion, one value per step):
`rewards.environment_reward` (their sum, an outcome reward) is the default reward with an environment, and
`rewards.environment_turn_rewards` (one step reward per turn) is the default under GRPO's `supervision: process`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..infra.imports import first_line, import_object


@dataclass
class EnvStep:
    """What `Environment.step` returns for one policy turn."""

    observation: str = ""  # text appended after the turn (the policy reads it, is not trained on it); "" none
    reward: float = 0.0  # this turn's reward (finite)
    done: bool = False  # True: the episode is over (no observation is appended, the row is finished)


class Environment:
    """Subclass it: `step` is required, `reset` optional (no first message). One instance = one episode."""

    def reset(self, row: dict[str, Any]) -> str:
        """Start the episode for dataset row `row`; return the first message ("" = the prompt alone)."""
        return ""

    def step(self, turn: str) -> EnvStep:
        """The policy's last turn (its text only, without the conversation before) -> an `EnvStep`."""
        raise NotImplementedError(f"{type(self).__name__} must implement step(turn) -> EnvStep")


def load_environment(spec: str | dict | Callable[[], Environment]) -> Callable[[], Environment]:
    """An environment class / factory, its import path, or `{"class_path": path, "init_args": {...}}` (YAML, as
    LightningCLI writes classes) -> a callable that builds one fresh episode object.

    Checked here (at module construction, before any rollout): the path imports, and the factory builds an object
    with a `step` method."""
    init_args: dict = {}
    if isinstance(spec, dict):
        unknown = set(spec) - {"class_path", "init_args"}
        if "class_path" not in spec or unknown or not isinstance(spec.get("init_args", {}), dict):
            raise ValueError(f"environment {spec!r}: a mapping needs 'class_path' and optionally 'init_args' (a "
                             "mapping), nothing else")
        spec, init_args = spec["class_path"], dict(spec.get("init_args") or {})
    target = import_object(spec, "environment") if isinstance(spec, str) else spec
    name = spec if isinstance(spec, str) else getattr(spec, "__name__", repr(spec))
    if not callable(target):
        raise ValueError(f"environment {name!r} is not a class or a factory (got {type(target).__name__})")
    factory = functools.partial(target, **init_args) if init_args else target
    try:
        probe = factory()
    except Exception as err:  # noqa: BLE001 - the user's constructor: one line naming it
        raise ValueError(f"environment {name!r}: building it failed: {first_line(err)}") from err
    if not callable(getattr(probe, "step", None)):
        raise ValueError(f"environment {name!r} builds a {type(probe).__name__}, which has no step(turn) method")
    return factory


def checked_step(env: Any, turn: str, row: int) -> EnvStep:
    """`env.step(turn)` as an `EnvStep` (an (observation, reward, done) tuple is accepted); anything else, or a
    reward that is not a finite number, is one RuntimeError line naming the environment and the row."""
    name = type(env).__name__
    try:
        out = env.step(turn)
    except Exception as err:
        raise RuntimeError(f"environment {name}.step raised on rollout row {row}: {first_line(err)}") from err
    if isinstance(out, tuple) and len(out) == 3:
        out = EnvStep(*out)
    if not isinstance(out, EnvStep):
        raise RuntimeError(f"environment {name}.step returned {type(out).__name__} on rollout row {row}; it must "
                           "return an EnvStep(observation, reward, done) or an (observation, reward, done) tuple")
    if not isinstance(out.observation, str):
        raise RuntimeError(f"environment {name}.step returned observation of type {type(out.observation).__name__} "
                           f"on rollout row {row}; it must be a str")
    try:
        reward = float(out.reward)
    except (TypeError, ValueError):
        reward = math.nan
    if not math.isfinite(reward) or isinstance(out.reward, bool):
        raise RuntimeError(f"environment {name}.step returned reward {out.reward!r} on rollout row {row}; it must be "
                           "a finite number")
    return EnvStep(out.observation, reward, bool(out.done))


def checked_reset(env: Any, row: dict[str, Any], index: int) -> str:
    """`env.reset(row)` (when the environment has one) as a str, errors as in `checked_step`."""
    reset = getattr(env, "reset", None)
    if reset is None:
        return ""
    name = type(env).__name__
    try:
        first = reset(row)
    except Exception as err:
        raise RuntimeError(f"environment {name}.reset raised on rollout row {index}: {first_line(err)}") from err
    if first is None:
        return ""
    if not isinstance(first, str):
        raise RuntimeError(f"environment {name}.reset returned {type(first).__name__} on rollout row {index}; it "
                           "must return the first message as a str ('' for none)")
    return first
