"""The bpf(2) system call through ctypes: maps, program loading, sockmap attachment.

Why raw bpf() and not libbpf: libbpf's value is loading ELF objects that a compiler produced (CO-RE
relocations, BTF, skeletons). tcpha's programs are a dozen instructions assembled in Python
(`tcpha.bpf.asm`; no clang on the machines, see docs/kernel.md "The BPF relay"), so what is left is six
commands with fixed-layout arguments: map create / update / delete / lookup / next key, program load,
program attach. Calling them directly needs no extra package, no symbol-version checks, and the kernel's
own error (errno plus the verifier's log) reaches the operator unchanged.

`union bpf_attr` (include/uapi/linux/bpf.h) is passed as a zero-filled buffer of ATTR_SIZE bytes with the
fields a command reads packed at their offsets; the kernel accepts a shorter or longer buffer as long as
the bytes it does not know are zero. The offsets are those of the uapi header of Linux 6.x (stable ABI:
fields are only ever appended).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

# x86-64 and arm64 numbers of bpf(2); others: extend here.
_NR_BPF = {"x86_64": 321, "aarch64": 280}

# commands
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY, PROG_LOAD = range(6)
PROG_ATTACH, PROG_DETACH = 8, 9
# map types
MAP_TYPE_HASH, MAP_TYPE_SOCKMAP, MAP_TYPE_SOCKHASH = 1, 15, 18
# program types
PROG_TYPE_SK_SKB = 14
# attach types
SK_SKB_STREAM_PARSER, SK_SKB_STREAM_VERDICT, SK_SKB_VERDICT = 4, 5, 38
# map update flags
ANY, NOEXIST, EXIST = 0, 1, 2
# map create flags
NO_PREALLOC = 1                  # hash maps: allocate entries on insert, not all at creation

ATTR_SIZE = 144                  # sizeof(union bpf_attr) in the 6.x uapi headers; zero-padded
LOG_SIZE = 64 * 1024             # verifier log buffer for a failed load

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf() call failed; str() is one line naming the command, the object and the kernel's reason."""


class VerifierError(BpfError):
    """The verifier rejected a program; `log` holds its full log, the message its last lines."""

    def __init__(self, err: int, message: str, log: str):
        super().__init__(err, message)
        self.log = log

    def __str__(self) -> str:
        return self.strerror or ""


def _bpf(cmd: int, attr: ctypes.Array, what: str) -> int:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(errno.ENOSYS, f"bpf(): no syscall number known for {platform.machine()}")
    ret = _libc.syscall(nr, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


def _attr(*fields: tuple[int, str, int | bytes]) -> ctypes.Array:
    """A zeroed bpf_attr with (offset, struct format, value) fields packed in."""
    buf = ctypes.create_string_buffer(ATTR_SIZE)
    for offset, fmt, value in fields:
        struct.pack_into("<" + fmt, buf, offset, value)
    return buf


def _addr(buf) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


class Map:
    """A BPF map owned by this process (closed with close(); the kernel frees it with its last user)."""

    def __init__(self, map_type: int, key_size: int, value_size: int, max_entries: int, name: str,
                 flags: int = 0):
        # map_type, key_size, value_size, max_entries, map_flags at 0..16; map_name[16] at 28
        attr = _attr((0, "I", map_type), (4, "I", key_size), (8, "I", value_size), (12, "I", max_entries),
                     (16, "I", flags), (28, "16s", name.encode()[:15]))
        self.fd = _bpf(MAP_CREATE, attr, f"creating BPF map {name!r} (type {map_type})")
        self.key_size = key_size
        self.value_size = value_size
        self.name = name

    def _elem(self, cmd: int, key: bytes, value, flags: int, what: str) -> None:
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name}: key of {len(key)} bytes, not {self.key_size}")
        kbuf = ctypes.create_string_buffer(key, len(key))
        # map_fd at 0, key pointer at 8, value pointer at 16, flags at 24
        attr = _attr((0, "I", self.fd), (8, "Q", _addr(kbuf)), (16, "Q", _addr(value)), (24, "Q", flags))
        _bpf(cmd, attr, f"{what} in BPF map {self.name!r}")

    def update(self, key: bytes, value: bytes, flags: int = ANY) -> None:
        if len(value) != self.value_size:
            raise ValueError(f"map {self.name}: value of {len(value)} bytes, not {self.value_size}")
        self._elem(MAP_UPDATE_ELEM, key, ctypes.create_string_buffer(value, len(value)), flags, "update")

    def lookup(self, key: bytes) -> bytes | None:
        vbuf = ctypes.create_string_buffer(self.value_size)
        try:
            self._elem(MAP_LOOKUP_ELEM, key, vbuf, 0, "lookup")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return vbuf.raw

    def delete(self, key: bytes) -> bool:
        """Remove key; False if it was not there."""
        try:
            self._elem(MAP_DELETE_ELEM, key, None, 0, "delete")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def keys(self) -> list[bytes]:
        """All keys (a snapshot; for tests and the status page, not for the data path)."""
        out: list[bytes] = []
        key: bytes | None = None
        while True:
            kbuf = ctypes.create_string_buffer(key, self.key_size) if key is not None else None
            nbuf = ctypes.create_string_buffer(self.key_size)
            attr = _attr((0, "I", self.fd), (8, "Q", _addr(kbuf)), (16, "Q", _addr(nbuf)))
            try:
                _bpf(MAP_GET_NEXT_KEY, attr, f"next key in BPF map {self.name!r}")
            except BpfError as e:
                if e.errno == errno.ENOENT:
                    return out
                raise
            key = nbuf.raw
            out.append(key)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Program:
    """A loaded BPF program. A verifier rejection raises VerifierError with the log's tail as message."""

    def __init__(self, prog_type: int, code: bytes, name: str, *, expected_attach_type: int = 0,
                 license: str = "GPL"):
        # Helpers such as sk_redirect_hash are GPL-only: the kernel requires a GPL-compatible license
        # string on programs that call them. It is a declaration to the kernel about these dozen
        # instructions (written here, not copied from anywhere), as every BPF program must make.
        if len(code) % 8:
            raise ValueError(f"program {name}: {len(code)} bytes is not whole instructions")
        lic = ctypes.create_string_buffer(license.encode())
        insns = ctypes.create_string_buffer(code, len(code))
        self.name = name

        def attempt(log_level: int, logbuf) -> int:
            attr = _attr((0, "I", prog_type), (4, "I", len(code) // 8), (8, "Q", _addr(insns)),
                         (16, "Q", _addr(lic)), (24, "I", log_level),
                         (28, "I", LOG_SIZE if logbuf is not None else 0), (32, "Q", _addr(logbuf)),
                         (68, "I", expected_attach_type), (48, "16s", name.encode()[:15]))
            return _bpf(PROG_LOAD, attr, f"loading BPF program {name!r}")

        try:
            self.fd = attempt(0, None)      # no log on the normal path (the kernel formats it otherwise)
        except BpfError as first:
            if first.errno not in (errno.EACCES, errno.EINVAL):
                raise
            logbuf = ctypes.create_string_buffer(LOG_SIZE)
            try:
                self.fd = attempt(1, logbuf)
            except BpfError as e:
                log = logbuf.value.decode(errors="replace").strip()
                tail = " | ".join(line for line in log.splitlines()[-3:] if line.strip())
                raise VerifierError(e.errno or first.errno,
                                    f"BPF program {name!r} rejected by the kernel's verifier "
                                    f"({os.strerror(e.errno or first.errno)}): {tail or 'no log'}",
                                    log) from None

    def attach(self, target_fd: int, attach_type: int) -> None:
        """Attach to target (a sockmap/sockhash fd for sk_skb programs)."""
        attr = _attr((0, "I", target_fd), (4, "I", self.fd), (8, "I", attach_type))
        _bpf(PROG_ATTACH, attr, f"attaching BPF program {self.name!r} (attach type {attach_type})")

    def detach(self, target_fd: int, attach_type: int) -> None:
        attr = _attr((0, "I", target_fd), (4, "I", self.fd), (8, "I", attach_type))
        _bpf(PROG_DETACH, attr, f"detaching BPF program {self.name!r}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
