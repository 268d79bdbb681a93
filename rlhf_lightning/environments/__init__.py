"""Environments: a task that answers the policy turn by turn (feedback, a game, a checker), with rewards per turn.

    base.py      the protocol: `Environment.reset(row) -> first message`, `Environment.step(turn) -> EnvStep`
                 (observation, reward, done), and `load_environment` (an import path from a config)
    feedback.py  the built-in example: `AnswerFeedback`, a checker that says "wrong" and lets the policy try again

The rollout loop that drives them is `rollout.multi_turn` (docs/tools.md, "Environments").
"""

from .base import Environment, EnvStep, load_environment
from .feedback import AnswerFeedback

__all__ = ["AnswerFeedback", "EnvStep", "Environment", "load_environment"]
