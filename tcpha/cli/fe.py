"""tcpha-fe: the front end (holds the VIP, peeks, matches the rules, hands connections off)."""

from __future__ import annotations

import logging
import sys

from tcpha.cli.service import DaemonStart
from tcpha.config import load_fe_config
from tcpha.fe.arbiter import FrontEnd
from tcpha.service import sd_notify

DEFAULT_CONFIG = "/etc/tcpha/tcphafe.conf"


def daemon_start() -> DaemonStart:
    return DaemonStart("tcpha-fe", "Content-aware TCP handoff front end: reads each request head (or TLS "
                       "ClientHello), matches the rules and hands the live connection to a back end.",
                       DEFAULT_CONFIG, "fe")


def main(argv: list[str] | None = None) -> int:
    start = daemon_start()
    args = start.parser.parse_args(argv)
    # A stop signal while the daemon starts: FrontEnd.run stops cleanly before any worker starts.
    start.hold_stop_signals()
    code = start.load(args, load_fe_config,
                      lambda c: f" ({len(c.servers)} servers, {len(c.rules)} rules)")
    if code is not None:
        return code
    config = start.config
    try:
        fe = FrontEnd(config)
        start.stop_with(lambda signum: fe.queue_signal(signum, None))
        fe.notify = sd_notify
        logging.getLogger("tcpha.fe").log(
            25, "tcpha-fe starting: VIP %s port(s) %s, %d servers, %d rules, %d workers", config.vaddr,
            " ".join(map(str, config.ports)), len(config.servers), len(config.rules), config.startservers)
        return fe.run()
    except KeyboardInterrupt:
        return 0
    finally:
        start.release()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
