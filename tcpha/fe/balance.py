"""Smooth weighted round robin (the nginx algorithm) over the members of a rule pool.

``rule = 10.0.0.11,10.0.0.12 .*`` names a pool: each connection the rule takes goes to one member chosen
by weight (``server ... weight=N``, the control file ``backends/NAME/weight``, SIGHUP), the others stay
behind it as fallbacks in file order. Every pick adds each in-service member's weight to its running
score, takes the highest score, and subtracts the sum of the weights from the winner's: weights 3 and 1
give ``a a b a`` and repeat, never ``a a a b`` bursts, and after n picks no member is more than one pick
away from its share ``n * w / sum(w)``.

State is per worker process (each worker picks for the connections it accepted), so with W workers the
whole front end's split is within W picks of the exact share. A member out of service (down, draining,
weight 0) is left out of the round and keeps its score; a weight change applies to the next pick.
No I/O: the dispatcher asks, the ledger holds the weights the control plane pushed.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["SmoothWRR"]


class SmoothWRR:
    def __init__(self) -> None:
        self.scores: dict[tuple[str, ...], dict[str, int]] = {}

    def pick(self, members: tuple[str, ...] | list[str], weight_of: Callable[[str], int]) -> str | None:
        """The member to try first (None when no member has a weight > 0 now)."""
        key = tuple(members)
        scores = self.scores.get(key)
        if scores is None:
            scores = self.scores[key] = {}
        best = None
        best_score = 0
        total = 0
        for name in key:
            weight = weight_of(name)
            if weight <= 0:
                continue
            score = scores.get(name, 0) + weight
            scores[name] = score
            total += weight
            if best is None or score > best_score:
                best, best_score = name, score
        if best is not None:
            scores[best] = best_score - total
        return best

    def order(self, members: list[str], weight_of: Callable[[str], int]) -> list[str]:
        """``members`` with the pick first and the others behind it in their order (the fallbacks)."""
        first = self.pick(members, weight_of)
        if first is None or first == members[0]:
            return list(members)
        return [first] + [m for m in members if m != first]
