"""tcpha-be: the back end (restores handed-off connections, relays them to the local application)."""

from __future__ import annotations

import argparse
import logging
import sys

DEFAULT_CONFIG = "/etc/tcpha/tcphabe.conf"


def build_parser() -> argparse.ArgumentParser:
    from tcpha.config import add_help
    p = argparse.ArgumentParser(
        prog="tcpha-be",
        description="TCP handoff back end: restores connections handed off by tcpha-fe and relays them "
                    "(splice) to the local application; replies go straight to the clients.")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="PATH",
                   help=f"configuration file (default {DEFAULT_CONFIG})")
    p.add_argument("--check-config", action="store_true",
                   help="check the configuration file and exit (0: good, 2: an error, printed)")
    p.add_argument("-d", "--daemon", action="store_true", help="detach and run in the background")
    p.add_argument("--pidfile", metavar="PATH", help="write the process id to PATH")
    p.add_argument("--dbglevel", type=int, choices=range(0, 7), metavar="0-6",
                   help="override the config file's dbglevel")
    add_help(p, "be")
    return p


def main(argv: list[str] | None = None) -> int:
    from tcpha.config import ConfigError, load_be_config
    args = build_parser().parse_args(argv)
    try:
        config = load_be_config(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if args.check_config:
        print(f"{args.config}: configuration is valid")
        return 0
    from tcpha.be.server import BackEnd
    from tcpha.cli.service import PidFile, daemonize, raise_nofile_limit, sd_notify, setup_logging
    if args.daemon:
        daemonize()
    dbglevel = args.dbglevel if args.dbglevel is not None else config.dbglevel
    raise_nofile_limit()
    setup_logging(dbglevel, config.logfile, "tcpha-be")
    log = logging.getLogger("tcpha.be")
    pidfile = PidFile(args.pidfile) if args.pidfile else None
    try:
        if pidfile is not None:
            pidfile.acquire()
    except RuntimeError as e:
        print(f"tcpha-be: {e}", file=sys.stderr)
        return 1
    be = BackEnd(config)
    be.on_ready = lambda: sd_notify("READY=1")
    try:
        be.run()
    except KeyboardInterrupt:
        pass
    except Exception as e:
        log.critical("tcpha-be stopped: %s", e)
        return 1
    finally:
        sd_notify("STOPPING=1")
        if pidfile is not None:
            pidfile.release()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
