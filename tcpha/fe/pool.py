"""How many front-end workers to run (Apache prefork / gunicorn style), sans-I/O.

A worker is *idle* when it is dispatching no connection at the moment the arbiter asks. Once a
second the arbiter asks every worker and applies ``decide``: fewer idle workers than
``minspareservers`` -> start one more (up to ``max_workers``); more idle than ``maxspareservers``
-> stop one (never below one worker; ``startservers`` is only the number at start). One step per tick keeps the pool
from oscillating on a single busy sample.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_WORKERS = 32


@dataclass
class SparePolicy:
    minspare: int
    maxspare: int
    floor: int = 1                 # never fewer workers
    max_workers: int = MAX_WORKERS

    def decide(self, busy: list[int]) -> int:
        """busy: connections being dispatched per worker. +1: start one, -1: stop one, 0: nothing."""
        total = len(busy)
        idle = sum(1 for b in busy if b == 0)
        if idle < self.minspare and total < self.max_workers:
            return 1
        if idle > self.maxspare and total > max(1, self.floor):
            return -1
        return 0
