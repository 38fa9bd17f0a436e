"""Early stopping on a validation metric, and which checkpoint was best (Prechelt 1998, "Early
Stopping - But When?": stop after `patience` validations without an improvement).

The state (best step and value, validations since) travels in every checkpoint, so a resumed run
stops exactly where the uninterrupted one would have.
"""

from __future__ import annotations

import math

from vgen.errors import ConfigError


class EarlyStopping:
    def __init__(self, cfg, state: dict | None = None):
        self.cfg = cfg  # vgen.families.config.EarlyStoppingConfig
        state = state or {}
        self.best_step: int | None = state.get("best_step")
        self.best_value: float | None = state.get("best_value")
        self.since_best: int = int(state.get("since_best", 0))
        self.improved = False  # the last validation is the new best (its checkpoint must be written)

    def check_metric(self, available: dict) -> None:
        """Refuse a metric the family does not report (called once, before training)."""
        if self.cfg.metric not in available:
            raise ConfigError(f"train.early_stopping.metric: {self.cfg.metric!r} is not a validation metric of this "
                              f"run; it reports {', '.join(sorted(available)) or 'none'}")

    def update(self, step: int, metrics: dict) -> None:
        """A validation's metrics; one without the metric (checked before training) counts as no
        improvement rather than stopping the run half-way."""
        value = float(metrics.get(self.cfg.metric, float("nan")))
        if self.best_value is None:
            better = math.isfinite(value)
        elif self.cfg.mode == "min":
            better = value < self.best_value - self.cfg.min_delta
        else:
            better = value > self.best_value + self.cfg.min_delta
        self.improved = better
        if better:
            self.best_step, self.best_value, self.since_best = step, value, 0
        else:
            self.since_best += 1

    @property
    def should_stop(self) -> bool:
        return self.since_best >= self.cfg.patience

    def state(self) -> dict:
        return {"best_step": self.best_step, "best_value": self.best_value, "since_best": self.since_best}

    def describe(self) -> str:
        best = "no finite value yet" if self.best_step is None else f"best {self.best_value:.5g} at step {self.best_step}"
        return f"{self.cfg.metric} has not improved for {self.since_best} validations; {best}"

    def best(self) -> dict | None:
        """What run.yaml records as `best`."""
        if self.best_step is None:
            return None
        return {"step": self.best_step, "metric": self.cfg.metric, "mode": self.cfg.mode, "value": self.best_value}
