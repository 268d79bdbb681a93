"""PPO's KL coefficient β: fixed, or the adaptive proportional controller (Ziegler et al. 2019 §2.2).

Both have the same interface (`value`, `update(current_kl, n_steps)`, `state_dict` / `load_state_dict`), so a
module swaps them by a setting (PPO's `adaptive_kl`); the state goes into checkpoints.
"""

from __future__ import annotations

from typing import Any


class FixedKLController:
    """A constant KL coefficient β. Same interface as AdaptiveKLController so modules can swap them."""

    def __init__(self, value: float) -> None:
        if value < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {value}")
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller that steers the measured KL toward `target` (Ziegler et al. 2019 §2.2):

        e = clip(KL / target - 1, -0.2, 0.2),    β <- β · (1 + e · n_steps / horizon)

    n_steps is the number of samples (episodes) the KL was measured on and horizon how many samples it
    takes β to move by a factor ~(1 + e); TRL's defaults were target=6, horizon=10000.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = int(state.get("horizon", self.horizon))
