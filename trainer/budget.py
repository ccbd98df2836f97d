"""``trainer fit --budget-min``: the epochs a fold's wall-clock budget allows, fitted from measured epoch times.

The cosine schedule (:func:`trainer.loop.cosine_lr`) decays to zero at the last epoch, so it must know
that epoch in advance. Its first epoch is a warm-up whose learning rates do not depend on the length, so
:class:`EpochBudget` fits the length after the first epoch from its measured time, and fits it again
whenever the measured speed moves by more than :data:`REFIT_CHANGE` (a busier machine, records cached
after the first epoch). Training ends after the epoch past which the next one would no longer fit.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: Relative change of the measured epoch time that re-fits the schedule's length.
REFIT_CHANGE = 0.10
#: Epochs whose times the speed is taken from (their median; the first epoch, which also caches the
#: scaled records, counts only while it is the only one).
SPEED_WINDOW = 3


def epochs_for_budget(budget_s: float, spent_s: float, epoch_s: float, done: int, most: int) -> int:
    """The last epoch the budget allows: ``done`` plus as many epochs of ``epoch_s`` as the remaining
    seconds hold, at most ``most`` and at least ``done`` (at least 1)."""
    if not epoch_s > 0:
        return max(min(most, max(done, 1)), 1)
    more = math.floor(max(budget_s - spent_s, 0.0) / epoch_s)
    return max(min(done + more, most), done, 1)


@dataclass
class EpochBudget:
    """A fold's budget and the schedule length fitted to it so far.

    Attributes:
        seconds: the fold's wall-clock budget for its epochs.
        most: the longest schedule (``--epochs``).
        epochs: the schedule's current length (``most`` until the first epoch is measured).
        fitted_epoch_s: the epoch time ``epochs`` was fitted with (None before the first fit).
        times: every epoch's measured seconds so far.
    """

    seconds: float
    most: int
    epochs: int = 0
    fitted_epoch_s: float | None = None
    times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            self.epochs = self.most

    def epoch_seconds(self) -> float:
        """The current speed: the median of the last :data:`SPEED_WINDOW` epochs after the first."""
        later = self.times[1:] or self.times
        return float(statistics.median(later[-SPEED_WINDOW:]))

    def record(self, epoch: int, epoch_s: float, spent_s: float) -> bool:
        """Records epoch ``epoch``'s time (``spent_s``: the fold's seconds so far); re-fits the length
        when the speed changed. Returns True when training should end after this epoch."""
        self.times.append(float(epoch_s))
        speed = self.epoch_seconds()
        if self.fitted_epoch_s is None or abs(speed - self.fitted_epoch_s) > REFIT_CHANGE * self.fitted_epoch_s:
            before = self.epochs
            self.epochs = epochs_for_budget(self.seconds, spent_s, speed, epoch, self.most)
            self.fitted_epoch_s = speed
            if self.epochs != before or len(self.times) == 1:
                log.info("budget: %.1f s per epoch, %.0f of %.0f s spent: the schedule ends after epoch %d",
                         speed, spent_s, self.seconds, self.epochs)
        # The speed may have dropped since the fit: never start an epoch that the budget cannot hold.
        if spent_s + speed > self.seconds:
            self.epochs = min(self.epochs, epoch)
        return epoch >= self.epochs

    def state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def restored(cls, state: dict[str, Any], seconds: float, most: int) -> EpochBudget:
        """The budget of a resumed fold: its recorded fit, with this invocation's budget and cap."""
        return cls(seconds=seconds, most=most, epochs=min(int(state["epochs"]), most),
                   fitted_epoch_s=state["fitted_epoch_s"], times=[float(t) for t in state["times"]])
