"""The built-in example environment: a checker that tells the policy its answer is wrong and lets it try again.

    prompt  "37+45="                      (any task whose rows have the columns the verifier reads, e.g. `answer`)
    turn 1  policy "72<eos>"              step -> EnvStep("\\nwrong\\n37+45=", 0.0, done=False)
    turn 2  policy "82<eos>"              step -> EnvStep("", 1.0, done=True)

`feedback` may hold `{prompt}`, replaced by the row's prompt text (a conversation's last user message):
restating the question keeps the next try in the form the policy was trained on (a tiny SFT model that sees
only "wrong" writes noise after it).

The verifier is an outcome reward function with TRL's signature (default `final_answer_match`: the last number of
the turn equals the row's `answer`), called on the turn alone with the row's columns, so every built-in task and
any dataset with an answer column works. With rewards per turn (1 for the right answer, 0 for a wrong one) the
episode's return is 1 if the policy got there within `max_turns`, else 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import Environment, EnvStep


class AnswerFeedback(Environment):
    """Says `feedback` after a wrong answer, ends the episode with reward `reward` at the right one."""

    def __init__(self, verifier: str | Callable = "rlhf_lightning.rewards.final_answer_match",
                 feedback: str = "\nwrong\n{prompt}", reward: float = 1.0) -> None:
        from ..rewards import resolve_reward_fn

        self.verifier = resolve_reward_fn(verifier)
        self.feedback, self.reward = feedback, float(reward)
        self.row: dict[str, Any] = {}

    def reset(self, row: dict[str, Any]) -> str:
        self.row = row
        return ""

    def step(self, turn: str) -> EnvStep:
        columns = {k: [v] for k, v in self.row.items() if k != "prompt"}
        right = float(self.verifier(prompts=[self.row.get("prompt", "")], completions=[turn], **columns)[0]) == 1.0
        if right:
            return EnvStep("", self.reward, True)
        return EnvStep(self.feedback.replace("{prompt}", _question(self.row.get("prompt", ""))), 0.0, False)


def _question(prompt: Any) -> str:
    """The prompt's text: a string as is; chat messages: the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    return str(users[-1]) if users else ""
