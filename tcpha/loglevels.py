"""The log levels tcpha adds to `logging` (NOTICE, TRACE) and TCPHA's dbglevel 0-6 mapped onto them.

Importing this module registers the two level names, so a record logged at NOTICE shows as "NOTICE".
Every module logs notices with ``log.log(NOTICE, ...)`` using the constant from here.
"""

from __future__ import annotations

import logging

__all__ = ["NOTICE", "TRACE", "DBGLEVELS", "dbglevel_to_logging"]

NOTICE = 25     # between INFO and WARNING: start, stop, reload, back ends added/removed/up/down
TRACE = 5       # below DEBUG: every step of every connection

logging.addLevelName(NOTICE, "NOTICE")
logging.addLevelName(TRACE, "TRACE")

# dbglevel (TCPHA's 0-6) -> (logging level, what is logged at it).
DBGLEVELS = {
    0: (logging.CRITICAL, "critical: only what stops the daemon"),
    1: (logging.ERROR, "errors"),
    2: (logging.WARNING, "warnings: back ends down, refused handoffs, bad control messages"),
    3: (NOTICE, "notices: start, stop, reload, back ends added/removed/up/down (default)"),
    4: (logging.INFO, "info: one line per handoff (client, back end, rule, timing)"),
    5: (logging.DEBUG, "debug"),
    6: (TRACE, "trace: every step of every connection"),
}


def dbglevel_to_logging(dbglevel: int) -> int:
    """The logging level for a dbglevel (0-6; values outside are clamped)."""
    return DBGLEVELS[max(0, min(6, dbglevel))][0]
