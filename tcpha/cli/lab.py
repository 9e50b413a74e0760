"""tcpha-lab: build, inspect and remove the namespace lab.

  tcpha-lab up [--name NAME] [--backends N | --topology FILE]
  tcpha-lab status [NAME]
  tcpha-lab exec [--name NAME] HOST CMD [ARG...]
  tcpha-lab down [NAME | --all]

A lab that is up is described by STATE_DIR/NAME.json (STATE_DIR: /run/tcpha-lab, or $TCPHA_LAB_STATE_DIR),
so later commands find it. When only one lab is up, NAME may be left out.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from pathlib import Path

from tcpha.lab.netns import LabError, NamespaceLab, lab_namespaces, pids_in_netns, remove_prefix
from tcpha.lab.topology import DEFAULT_TOPOLOGY, TopologyError, load_topology, make_topology
from tcpha.lab.demo import run_demo

PROG = "tcpha-lab"


class UsageError(Exception):
    """Bad arguments or an unknown lab/host: one line, exit status 2."""


def state_dir() -> Path:
    return Path(os.environ.get("TCPHA_LAB_STATE_DIR", "/run/tcpha-lab"))


def state_path(name: str) -> Path:
    return state_dir() / f"{name}.json"


def known_labs() -> list[str]:
    d = state_dir()
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.json"))


def pick_lab(name: str | None) -> str:
    if name:
        return name
    labs = known_labs()
    if not labs:
        raise UsageError(f"no lab is up (start one with: {PROG} up)")
    if len(labs) > 1:
        raise UsageError(f"several labs are up ({', '.join(labs)}): say which with --name NAME")
    return labs[0]


def open_lab(name: str) -> NamespaceLab:
    path = state_path(name)
    try:
        return NamespaceLab.load(path)
    except FileNotFoundError:
        raise UsageError(f"no lab named {name!r} (no {path})") from None
    except (ValueError, KeyError, TypeError, TopologyError) as e:
        raise LabError(f"{path}: unreadable lab state: {e}") from None


# -- commands ------------------------------------------------------------------------------------

def cmd_up(args: argparse.Namespace) -> int:
    if args.topology and args.backends is not None:
        raise UsageError("--topology and --backends exclude each other")
    if args.topology:
        topology = load_topology(args.topology)
    elif args.backends is not None:
        topology = make_topology(args.backends)
    else:
        topology = DEFAULT_TOPOLOGY
    name = args.name or _fresh_name()
    if state_path(name).exists():
        raise LabError(f"lab {name} is already up (see: {PROG} status {name})")
    lab = NamespaceLab(topology, name)
    lab.up()
    try:
        lab.save(state_path(name))
    except OSError as e:
        lab.down()
        raise LabError(f"cannot write {state_path(name)}: {e.strerror}") from None
    print(f"lab {name} is up ({len(topology.hosts)} hosts, subnet {topology.subnet}, "
          f"vip {topology.vip} not configured)")
    _print_hosts(lab, with_processes=False)
    print(f"run a command in a host: {PROG} exec{'' if len(known_labs()) == 1 else ' --name ' + name} "
          f"HOST CMD...   remove it: {PROG} down {name}")
    return 0


def _fresh_name() -> str:
    for _ in range(100):
        name = "lab" + secrets.token_hex(2)[:3]
        if not state_path(name).exists() and not lab_namespaces(name):
            return name
    raise LabError("could not find a free lab name; pass --name")


def cmd_status(args: argparse.Namespace) -> int:
    names = [args.name] if args.name else known_labs()
    if not names:
        print("no lab is up")
        return 0
    for i, name in enumerate(names):
        lab = open_lab(name)
        if i:
            print()
        missing = [n for n in lab.namespaces() if n not in lab_namespaces(lab.prefix)]
        health = "up" if not missing else f"BROKEN (missing namespaces: {' '.join(missing)})"
        print(f"lab {name}: {health}; subnet {lab.topology.subnet}, vip {lab.vip}, "
              f"switch namespace {lab.switch_netns} (bridge {lab.bridge})")
        _print_hosts(lab, with_processes=True)
    return 0


def _print_hosts(lab: NamespaceLab, *, with_processes: bool) -> None:
    procs: dict[str, list[int]] = {}
    if with_processes:
        for pid, ns in sorted(pids_in_netns(lab.namespaces()).items()):
            procs.setdefault(ns, []).append(pid)
    rows = [("HOST", "ROLE", "NAMESPACE", "ADDRESSES", "MAC")]
    for h in lab.topology.hosts:
        ns = lab.netns(h.name)
        try:
            addrs = " ".join(a for a in lab.addresses(h.name) if not a.endswith("@lo") or
                             not a.startswith("127.")) or "-"
            mac = lab.mac(h.name)
        except Exception:  # a broken lab still gets a status line per host
            addrs, mac = "(namespace missing)", "-"
        rows.append((h.name, h.role, ns, addrs, mac))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        if with_processes and r[0] != "HOST":
            for pid in procs.get(lab.netns(r[0]), []):
                print(f"      pid {pid}: {_cmdline(pid)}")


def _cmdline(pid: int) -> str:
    try:
        # lazy: psutil takes ~0.1 s to import; only the process listing of `status` needs it
        import psutil
        cmd = psutil.Process(pid).cmdline()
        return " ".join(cmd) or f"[{psutil.Process(pid).name()}]"
    except Exception:
        return "?"


def cmd_exec(args: argparse.Namespace) -> int:
    if not args.cmd:
        raise UsageError("exec needs a command: tcpha-lab exec HOST CMD [ARG...]")
    lab = open_lab(pick_lab(args.name))
    try:
        argv = lab.command(args.host, args.cmd)
    except KeyError:
        raise UsageError(f"lab {lab.prefix} has no host {args.host!r} "
                         f"(hosts: {', '.join(lab.hosts)})") from None
    sys.stdout.flush()
    # exec: the command's exit status is ours, signals reach it directly.
    os.execvp(argv[0], argv)
    return 127  # not reached


def cmd_down(args: argparse.Namespace) -> int:
    if args.all:
        if args.name:
            raise UsageError("give a NAME or --all, not both")
        names = known_labs()
    else:
        names = [pick_lab(args.name)]
    for name in names:
        path = state_path(name)
        if path.exists():
            try:
                lab = open_lab(name)
            except LabError as e:
                print(f"{PROG}: {e}; removing namespaces named {name}-*", file=sys.stderr)
                remove_prefix(name)
            else:
                lab.down()
            path.unlink(missing_ok=True)
            print(f"lab {name} is down")
        elif lab_namespaces(name):  # state lost (e.g. /run wiped): still clean up by prefix
            removed = remove_prefix(name)
            print(f"lab {name}: no state file; removed namespaces {' '.join(removed)}")
        else:
            raise UsageError(f"no lab named {name!r}")
    return 0


# -- entry point ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="The tcpha namespace lab: client, front end, "
                                "back ends and cache host as network namespaces on one bridge.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="build a lab")
    up.add_argument("--name", help="lab name, 1-6 lower-case letters/digits (default: a fresh one)")
    up.add_argument("--backends", type=int, metavar="N", help="number of back ends (default 2)")
    up.add_argument("--topology", metavar="FILE", help="topology file (see conf/lab/default.toml)")
    up.set_defaults(func=cmd_up)

    st = sub.add_parser("status", help="show labs, hosts, addresses and processes")
    st.add_argument("name", nargs="?", metavar="NAME")
    st.set_defaults(func=cmd_status)

    ex = sub.add_parser("exec", help="run a command inside a host's namespace")
    ex.add_argument("--name", help="the lab (needed when several are up)")
    ex.add_argument("host", metavar="HOST")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")
    ex.set_defaults(func=cmd_exec)

    dn = sub.add_parser("down", help="remove a lab and everything running in it")
    dn.add_argument("name", nargs="?", metavar="NAME")
    dn.add_argument("--all", action="store_true", help="remove every lab that is up")
    dn.set_defaults(func=cmd_down)

    de = sub.add_parser("demo", help="the main job: a lab with tcpha-fe, two tcpha-be and a cache host, "
                                     "real HTTP and TLS traffic, a summary table; removed afterwards")
    de.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    de.add_argument("--cache-backend", choices=("memory", "redis-cluster"), default="memory",
                    help="dc_server's store on the cache host: embedded (default) or a 3+3 Redis Cluster there")
    de.set_defaults(func=cmd_demo)
    return p


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(keep=args.keep, cache_backend=args.cache_backend)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s")
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print(f"{PROG}: must run as root (network namespaces need CAP_SYS_ADMIN)", file=sys.stderr)
        return 1
    try:
        return args.func(args)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except (LabError, TopologyError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
