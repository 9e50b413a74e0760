"""tcpha-be: the back end (restores handed-off connections, relays them to the local application)."""

from __future__ import annotations

import logging
import sys

from tcpha.be.server import BackEnd
from tcpha.cli.service import DaemonStart
from tcpha.config import load_be_config
from tcpha.service import sd_notify

DEFAULT_CONFIG = "/etc/tcpha/tcphabe.conf"


def daemon_start() -> DaemonStart:
    return DaemonStart("tcpha-be", "TCP handoff back end: restores connections handed off by tcpha-fe and "
                       "relays them (splice) to the local application; replies go straight to the clients.",
                       DEFAULT_CONFIG, "be")


def main(argv: list[str] | None = None) -> int:
    start = daemon_start()
    args = start.parser.parse_args(argv)
    # A stop signal while the daemon starts, before the event loop takes the signals over: obeyed as
    # soon as the back end exists (a clean stop).
    start.hold_stop_signals()
    code = start.load(args, load_be_config)
    if code is not None:
        return code
    be = BackEnd(start.config)
    start.stop_with(lambda signum: be.stop())
    be.on_ready = lambda: sd_notify("READY=1")
    try:
        be.run()
    except KeyboardInterrupt:
        pass
    except Exception as e:
        logging.getLogger("tcpha.be").critical("tcpha-be stopped: %s", e)
        return 1
    finally:
        sd_notify("STOPPING=1")
        start.release()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
