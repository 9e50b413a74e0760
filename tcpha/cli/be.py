"""tcpha-be: the back end (restores handed-off connections, relays them to the local application)."""

from __future__ import annotations

import logging
import signal
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
    be: BackEnd | None = None
    asked = False

    def stop(signum: int, frame: object) -> None:
        nonlocal asked
        if be is None:
            asked = True
        else:
            be.stop()

    # SIGTERM or SIGINT while the daemon starts (systemd stopping a service it has just started), before
    # the event loop takes them over: remembered and obeyed as soon as it can be, as a clean stop. The
    # default action would kill it with the pidfile left behind and, once installed, the VIP on lo and
    # its ARP filter on the host.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    code = start.load(args, load_be_config)
    if code is not None:
        return code
    be = BackEnd(start.config)
    if asked:
        be.stop()
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
