"""The start-up that the tcpha-fe and tcpha-be commands share (options, the config file, exit statuses).

The service plumbing it calls (logging, daemonizing, the pidfile, ...) is tcpha/service.py.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable

from tcpha.config import ConfigError, add_help
from tcpha.service import STOP_SIGNALS, PidFile, daemonize, raise_nofile_limit, setup_logging


class DaemonStart:
    """The start-up that tcpha-fe and tcpha-be share: their common options, the config file (one line
    `PATH:LINE: message` and exit 2 on an error), --check-config, -d, logging at dbglevel and the pidfile.

        start = DaemonStart("tcpha-fe", "...", "/etc/tcpha/tcphafe.conf", "fe")
        args = start.parser.parse_args(argv)
        code = start.load(args, load_fe_config, summary)   # None: go on; else the exit status
        ... run start.config ...; finally start.release()

    Stop signals from process start until the daemon can obey them: `hold_stop_signals()` first thing,
    `stop_with(obey)` once the daemon object exists.
    """

    def __init__(self, prog: str, description: str, default_config: str, component: str) -> None:
        self.prog = prog
        self.config = None
        self.pidfile: PidFile | None = None
        p = argparse.ArgumentParser(prog=prog, description=description)
        p.add_argument("-c", "--config", default=default_config, metavar="PATH",
                       help=f"configuration file (default {default_config})")
        p.add_argument("--check-config", action="store_true",
                       help="check the configuration file and exit (0: good, 2: an error, printed)")
        p.add_argument("-d", "--daemon", action="store_true", help="detach and run in the background")
        p.add_argument("--pidfile", metavar="PATH", help="write the process id to PATH")
        p.add_argument("--dbglevel", type=int, choices=range(0, 7), metavar="0-6",
                       help="override the config file's dbglevel")
        add_help(p, component)
        self.parser = p
        self._held: list[int] = []
        self._obey: Callable[[int], None] | None = None

    def hold_stop_signals(self) -> None:
        """SIGTERM or SIGINT from now until `stop_with` (systemd stopping a service it has just started):
        remembered, so that the daemon stops cleanly as soon as it can. Their default action would kill it
        with its pidfile left behind and, once installed, its kernel state (the VIP, the ARP filter, the
        steering table)."""
        def stop(signum: int, frame: object) -> None:
            if self._obey is None:
                self._held.append(signum)
            else:
                self._obey(signum)
        for sig in STOP_SIGNALS:
            signal.signal(sig, stop)

    def stop_with(self, obey: Callable[[int], None]) -> None:
        """From now on a stop signal calls obey(signum); those held until now are given to it at once."""
        self._obey = obey
        held, self._held = self._held, []
        for signum in held:
            obey(signum)

    def load(self, args, loader, summary=lambda config: "") -> int | None:
        try:
            self.config = loader(args.config)
        except ConfigError as e:
            print(e, file=sys.stderr)
            return 2
        if args.check_config:
            for line in self.config.warnings:
                print(line, file=sys.stderr)
            print(f"{args.config}: configuration is valid{summary(self.config)}")
            return 0
        if args.daemon:
            daemonize()
        raise_nofile_limit()
        setup_logging(args.dbglevel if args.dbglevel is not None else self.config.dbglevel,
                      self.config.logfile, self.prog)
        for line in self.config.warnings:
            logging.getLogger(self.prog).warning("%s", line)
        if args.pidfile:
            try:
                self.pidfile = PidFile(args.pidfile)
                self.pidfile.acquire()
            except RuntimeError as e:
                self.pidfile = None
                print(f"{self.prog}: {e}", file=sys.stderr)
                return 1
        return None

    def release(self) -> None:
        if self.pidfile is not None:
            self.pidfile.release()
