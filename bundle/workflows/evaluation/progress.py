"""Progress of a run of many cells: "cell k of N" with an estimate of the time left, logged at INFO."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["CellProgress", "duration"]

logger = logging.getLogger("bundle.workflows.evaluation")


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 20 s``, ``2 h 05 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class CellProgress:
    """Logs the start of each of ``total`` cells with an estimate of the time left (the mean time of the cells so far).

    Args:
        total: the number of cells this process runs.
        prefix: put before each message (e.g. ``"rank 1 of 2: "``).
        clock: seconds, monotonic.
    """

    def __init__(self, total: int, prefix: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.prefix, self.clock = int(total), prefix, clock
        self.done, self.started = 0, clock()

    def seconds_left(self) -> float | None:
        """The estimated seconds until the last cell ends; ``None`` before the first one has ended."""
        if self.done == 0:
            return None
        return (self.clock() - self.started) / self.done * (self.total - self.done)

    def start(self, what: str) -> str:
        """Log (and return) ``cell k of N: what (about ... left)`` for the next cell."""
        left = self.seconds_left()
        estimate = "time left not known yet" if left is None else f"about {duration(left)} left"
        message = f"{self.prefix}cell {self.done + 1} of {self.total}: {what} ({estimate})"
        logger.info(message)
        return message

    def finish(self) -> None:
        """The current cell has ended; after the last one, log the total time."""
        self.done += 1
        if self.done == self.total:
            cells = "1 cell" if self.total == 1 else f"{self.total} cells"
            logger.info("%s%s in %s", self.prefix, cells, duration(self.clock() - self.started))
