"""tcpha-ctl: read and write a running tcpha-fe / tcpha-be's control files over its control socket.

    tcpha-ctl ls                                  the control files (w: writable)
    tcpha-ctl get sys/dtcinterval                 the value in force
    tcpha-ctl set sys/dtcinterval 5               refused with exit status 1 and one line if invalid
    tcpha-ctl --json get conn                     structured output for scripts
    tcpha-ctl --be get conn                       the back end's (rundir /run/tcpha/be)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tcpha.runtime.ctlsock import request
from tcpha.runtime.plane import socket_path


def socket_for(rundir: str) -> str:
    for path in (socket_path(rundir), os.path.join(rundir, "ctl.sock")):
        if os.path.exists(path):
            return path
    return socket_path(rundir)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tcpha-ctl", description="Read and write a running tcpha daemon's control files.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-r", "--rundir", help="the daemon's rundir (default /run/tcpha/fe)")
    where.add_argument("--be", action="store_true", help="the back end's default rundir, /run/tcpha/be")
    where.add_argument("-s", "--socket", help="the control socket itself")
    p.add_argument("--json", action="store_true", help="JSON output")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list the control files")
    g = sub.add_parser("get", help="print a control file")
    g.add_argument("path")
    s = sub.add_parser("set", help="write a control file")
    s.add_argument("path")
    s.add_argument("value")
    sub.add_parser("status", help="print the status file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rundir = args.rundir or ("/run/tcpha/be" if args.be else "/run/tcpha/fe")
    sock = args.socket or socket_for(rundir)
    if args.command == "ls":
        req = {"op": "list"}
    elif args.command in ("get", "status"):
        req = {"op": "read", "path": getattr(args, "path", "status")}
    else:
        req = {"op": "write", "path": args.path, "value": args.value}
    try:
        reply = request(sock, req)
    except FileNotFoundError:
        print(f"tcpha-ctl: {sock}: no control socket (is the daemon running? wrong --rundir?)", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"tcpha-ctl: {sock}: {e}", file=sys.stderr)
        return 2
    if not reply.get("ok"):
        if args.json:
            print(json.dumps(reply))
        print(f"tcpha-ctl: {reply.get('error', 'failed')}", file=sys.stderr)
        return 1
    if args.json:
        out = {"ls": lambda: reply["files"], "set": lambda: {"ok": True}}.get(args.command, lambda: reply["data"])()
        print(json.dumps(out, indent=None))
    elif args.command == "ls":
        for f in reply["files"]:
            print(f"{'w' if f['writable'] else '-'} {f['path']:<36} {f['doc']}")
    elif args.command in ("get", "status"):
        sys.stdout.write(reply["text"])
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
