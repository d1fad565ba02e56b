"""A wall-time budget for the training loop (--time_budget_minutes).

The run times its first loop's steps after the first one (which traces
and compiles), then cuts the schedule to the steps that fit in what is
left of the budget at that rate, never more than --train_steps /
--train_epochs give. The decision is written to model_dir/time_budget.json
so that a resumed run ends at the same step with the same learning rates
instead of measuring again.
"""

from __future__ import annotations

import dataclasses
import math

from simclr_tf import file_io

FILE_NAME = "time_budget.json"


@dataclasses.dataclass(frozen=True)
class Decision:
    """Where a budgeted run ends and what it was measured from."""

    total_steps: int
    configured_steps: int
    step_seconds: float
    budget_seconds: float

    def describe(self, steps_per_epoch: int) -> str:
        """One log line: the measured rate and the schedule it gives."""
        epochs = self.total_steps / max(steps_per_epoch, 1)
        return (
            f"time budget {self.budget_seconds / 60:.1f} min: "
            f"{self.step_seconds:.3f} s/step measured, so "
            f"{self.total_steps} steps ({epochs:.2f} epochs) of the "
            f"configured {self.configured_steps}"
        )


def decide(
    *,
    step: int,
    elapsed_seconds: float,
    step_seconds: float,
    budget_seconds: float,
    configured_steps: int,
    warmup_steps: int,
) -> Decision:
    """The last step of a budgeted run.

    Args:
      step: steps taken so far.
      elapsed_seconds: wall time of the loop so far (compiling included).
      step_seconds: measured seconds per step, compiling excluded.
      budget_seconds: the budget of the whole loop.
      configured_steps: the schedule's total before the budget.
      warmup_steps: the warm-up; the cosine decay needs a step after it.

    Returns:
      The Decision: configured_steps when they fit, else the steps that
      fit, at least one more than both `step` and the warm-up.
    """
    remaining = max(budget_seconds - elapsed_seconds, 0.0)
    fitting = step + math.floor(remaining / max(step_seconds, 1e-9))
    total = min(configured_steps, max(fitting, step + 1, warmup_steps + 1))
    return Decision(
        total_steps=total,
        configured_steps=configured_steps,
        step_seconds=step_seconds,
        budget_seconds=budget_seconds,
    )


def load(model_dir: str, budget_minutes: float) -> Decision | None:
    """The decision an earlier run of this model_dir made, if any, and
    only while a budget is set (budget_minutes > 0): a run resumed
    without --time_budget_minutes trains its whole schedule."""
    if budget_minutes <= 0:
        return None
    path = file_io.join(model_dir, FILE_NAME)
    if not file_io.exists(path):
        return None
    return Decision(**file_io.read_json(path))


def save(model_dir: str, decision: Decision) -> None:
    """Writes the decision for resumed runs (chief only)."""
    file_io.write_json(
        file_io.join(model_dir, FILE_NAME), dataclasses.asdict(decision)
    )
