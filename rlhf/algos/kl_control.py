"""KL coefficient controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences")."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class KLController:
    """beta, fixed, or adapted towards a target KL when `target` is set.

    Adaptive rule: e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / horizon),
    with n the samples of the step, so beta grows when the policy drifts past the target.
    """

    coef: float
    target: Optional[float] = None
    horizon: int = 10000

    def update(self, kl: float, n_samples: int) -> float:
        if self.target is not None and kl == kl:  # NaN-safe
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + error * n_samples / self.horizon
        return self.coef

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state["coef"])
