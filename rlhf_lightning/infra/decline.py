"""A guard a user sees: a held-out metric that stays clearly below where training started.

RL can make a policy worse than its warm start (a learning rate copied from another recipe, a KL too weak to hold
it, a learned reward being exploited), and the metric that shows it is already logged: `DeclineWatch` reads it
after each validation and says so once, in one line naming the likely causes, instead of letting the run finish
quietly on a worse policy.
"""

from __future__ import annotations

import math


class DeclineWatch:
    """Remembers a metric's starting value (the sanity check's, i.e. the warm start, else the first validation's)
    and reports once when `patience` validations in a row are more than `margin` below it.

    update(value, start=False) -> the first value and the latest ones when it should warn, else None.
    state_dict / load_state_dict: what a checkpoint keeps, so a resumed run compares with the original start.
    """

    def __init__(self, margin: float = 0.05, patience: int = 2):
        self.margin, self.patience = margin, patience
        self.start: float | None = None
        self.below: list[float] = []
        self.warned = False

    def update(self, value: float, start: bool = False) -> tuple[float, list[float]] | None:
        if math.isnan(value):  # no verdict this time
            return None
        if self.start is None:  # the sanity check (the warm start), or else the first validation
            self.start = value
            return None
        if start:  # a later sanity check (a resumed run restored its start): not a validation of training
            return None
        self.below = self.below + [value] if value < self.start - self.margin else []
        if len(self.below) >= self.patience and not self.warned:
            self.warned = True
            return self.start, list(self.below)
        return None

    def state_dict(self) -> dict:
        return {"start": self.start, "below": list(self.below), "warned": self.warned}

    def load_state_dict(self, state: dict) -> None:
        self.start, self.below, self.warned = state["start"], list(state["below"]), bool(state["warned"])
