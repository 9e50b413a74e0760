"""dc_test command (see tcpha.distcache.dctest)."""

from __future__ import annotations

import os
import signal
import sys

from tcpha.distcache.dctest import main as _main


def main(argv: list[str] | None = None) -> int:
    # The original ignores SIGPIPE: a server that goes away is a failed transaction, not a kill.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 1
    except BrokenPipeError:
        # stdout closed early (e.g. piped into head): no traceback.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 1


if __name__ == "__main__":
    sys.exit(main())
