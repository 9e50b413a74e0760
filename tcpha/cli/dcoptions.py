"""What the distcache commands (dc_server, dc_client) share in parsing their single-dash options:
the error type and the value conversions, with the original's messages."""

from __future__ import annotations


# The last lines of the option list in the original usage texts of dc_server and dc_client (identical in both).
DAEMON_USAGE = [
    '  -user <user>       (run daemon as given user)',
    '  -sockowner <user>  (controls ownership of unix domain listening socket)',
    '  -sockgroup <group> (controls ownership of unix domain listening socket)',
    '  -sockperms <oct>   (set permissions of unix domain listening socket)',
    '  -pidfile <path>    (a file to store the process ID in)',
    '  -killable          (exit cleanly on a SIGUSR1 or SIGUSR2 signal)',
    '  -<h|help|?>        (display this usage message)',
]


class UsageError(Exception):
    """An option error: the message line, then the usage text, exit 1."""


def invalid(opt: str) -> UsageError:
    return UsageError(f"Error, {opt} given an invalid argument")


def strtoul(text: str, opt: str, lo: int, hi: int) -> int:
    """The original's strtoul(): it must consume the whole argument, and the value be in [lo, hi]."""
    if not text or not text.isascii() or not text.isdigit() or not lo <= int(text) <= hi:
        raise invalid(opt)
    return int(text)


def octal(text: str, opt: str) -> int:
    """-sockperms: octal permission bits, 0..07777."""
    try:
        value = int(text, 8)
    except ValueError:
        raise invalid(opt) from None
    if not 0 <= value <= 0o7777:
        raise invalid(opt)
    return value
