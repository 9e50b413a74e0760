"""tcpha-fe: the front end (holds the VIP, peeks, matches the rules, hands connections off)."""

from __future__ import annotations

import argparse
import logging
import sys

DEFAULT_CONFIG = "/etc/tcpha/tcphafe.conf"


def build_parser() -> argparse.ArgumentParser:
    from tcpha.config import add_help
    p = argparse.ArgumentParser(
        prog="tcpha-fe",
        description="Content-aware TCP handoff front end: reads each request head (or TLS ClientHello), "
                    "matches the rules and hands the live connection to a back end.")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="PATH",
                   help=f"configuration file (default {DEFAULT_CONFIG})")
    p.add_argument("--check-config", action="store_true",
                   help="check the configuration file and exit (0: good, 2: an error, printed)")
    p.add_argument("-d", "--daemon", action="store_true", help="detach and run in the background")
    p.add_argument("--pidfile", metavar="PATH", help="write the process id to PATH")
    p.add_argument("--dbglevel", type=int, choices=range(0, 7), metavar="0-6",
                   help="override the config file's dbglevel")
    add_help(p, "fe")
    return p


def main(argv: list[str] | None = None) -> int:
    from tcpha.config import ConfigError, load_fe_config
    args = build_parser().parse_args(argv)
    try:
        config = load_fe_config(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if args.check_config:
        print(f"{args.config}: configuration is valid ({len(config.servers)} servers, {len(config.rules)} rules)")
        return 0
    from tcpha.cli.service import PidFile, daemonize, raise_nofile_limit, sd_notify, setup_logging
    from tcpha.fe.arbiter import FrontEnd
    if args.daemon:
        daemonize()
    dbglevel = args.dbglevel if args.dbglevel is not None else config.dbglevel
    raise_nofile_limit()
    setup_logging(dbglevel, config.logfile, "tcpha-fe")
    log = logging.getLogger("tcpha.fe")
    pidfile = PidFile(args.pidfile) if args.pidfile else None
    try:
        if pidfile is not None:
            pidfile.acquire()
    except RuntimeError as e:
        print(f"tcpha-fe: {e}", file=sys.stderr)
        return 1
    try:
        fe = FrontEnd(config)
        fe.notify = sd_notify
        log.log(25, "tcpha-fe starting: VIP %s port(s) %s, %d servers, %d rules, %d workers",
                config.vaddr, " ".join(map(str, config.ports)), len(config.servers), len(config.rules),
                config.startservers)
        return fe.run()
    except KeyboardInterrupt:
        return 0
    finally:
        if pidfile is not None:
            pidfile.release()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
