"""Skipped optimizer steps: ``train_step`` skips a step whose loss or gradient norm is not finite
(``actor/skipped_steps``); :class:`SkipGuard` stops the run once more than ``trainer.max_skipped_steps``
steps in a row were skipped (a teacher or a loss that only produces NaN would otherwise train nothing,
silently, until the end). The weights never took a skipped step, so the last checkpoint stays good."""

from __future__ import annotations


class TooManySkippedSteps(RuntimeError):
    """More than ``trainer.max_skipped_steps`` optimizer steps in a row were skipped."""


class SkipGuard:
    """Counts the skipped steps in a row; :meth:`after` raises :class:`TooManySkippedSteps` past the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.first: int | None = None  # the first batch of the current streak
        self.total = 0

    def after(self, batch: int, metrics: dict[str, float]) -> None:
        """Account for batch ``batch``'s step (its ``actor/skipped_steps``)."""
        if not metrics.get("actor/skipped_steps"):
            self.in_a_row, self.first = 0, None
            return
        self.total += 1
        self.in_a_row += 1
        self.first = batch if self.first is None else self.first
        if self.in_a_row > self.limit:
            raise TooManySkippedSteps(
                f"{self.in_a_row} optimizer steps in a row (batches {self.first}..{batch}) had a non-finite "
                f"loss or gradient norm, more than trainer.max_skipped_steps={self.limit}; none reached the "
                "weights, the last checkpoint is intact; check the teacher's replies, loss.* and optim.lr"
            )
