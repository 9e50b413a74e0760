"""A small, isolated ctypes shim on the libssl that the stdlib ``ssl`` module is linked to.

Why hand-written: no Python library exposes OpenSSL's server session callbacks.  pyOpenSSL and
cryptography have no session callbacks and carry their own, statically linked OpenSSL; the stdlib
``ssl`` module has the callbacks in C but no Python API for them.  So we reach the ``SSL_CTX`` of a
stdlib :class:`ssl.SSLContext` and call the same shared library the ``_ssl`` module uses.

Everything that touches raw pointers is in this module, and nothing here is used before
:func:`context_pointer` has checked, with the context's own Python API as the reference, that the
pointer really is that context's ``SSL_CTX`` in that library.  Any failed check raises
:class:`ShimError` (one line): the caller then runs without a shared cache.
"""

from __future__ import annotations

import _ssl
import ctypes
import os
import ssl
import subprocess
import sys
from ctypes import (CFUNCTYPE, POINTER, c_char_p, c_int, c_long, c_ubyte, c_uint, c_uint64, c_ulong,
                    c_void_p)

__all__ = ["ShimError", "LibSSL", "libssl", "context_pointer",
           "NEW_SESSION_CB", "GET_SESSION_CB", "REMOVE_SESSION_CB", "INFO_CB",
           "SESS_CACHE_SERVER", "SESS_CACHE_NO_INTERNAL", "CTRL_SET_SESS_CACHE_MODE",
           "CTRL_GET_SESS_CACHE_MODE", "CB_ALERT", "AL_FATAL", "MAX_SID_CTX_LENGTH"]


class ShimError(Exception):
    """A self-check failed; str(e) is one line saying which."""


# Constants from OpenSSL's public headers (ssl.h, ssl3.h); stable across 1.1.1 and 3.x.
CTRL_SET_SESS_CACHE_MODE = 44          # SSL_CTRL_SET_SESS_CACHE_MODE
CTRL_GET_SESS_CACHE_MODE = 45          # SSL_CTRL_GET_SESS_CACHE_MODE
CTRL_GET_MIN_PROTO_VERSION = 130       # SSL_CTRL_GET_MIN_PROTO_VERSION
SESS_CACHE_SERVER = 0x0002             # SSL_SESS_CACHE_SERVER
SESS_CACHE_NO_INTERNAL = 0x0100 | 0x0200   # SSL_SESS_CACHE_NO_INTERNAL_LOOKUP | _STORE
CB_ALERT = 0x4000                      # SSL_CB_ALERT (info callback "where" bit)
AL_FATAL = 2                           # SSL3_AL_FATAL
MAX_SID_CTX_LENGTH = 32                # SSL_MAX_SID_CTX_LENGTH
ERR_LIB_SSL = 20                       # err.h
ERR_LIB_OFFSET = 23
ERR_REASON_MASK = 0x7FFFFF
SSL_R_UNEXPECTED_EOF_WHILE_READING = 294   # sslerr.h
SSL_VERIFY_PEER = 0x01
SSL_VERIFY_FAIL_IF_NO_PEER_CERT = 0x02

# Callback prototypes (ssl.h):
#   int  (*new_session_cb)(SSL *ssl, SSL_SESSION *sess)
#   SSL_SESSION *(*get_session_cb)(SSL *ssl, const unsigned char *id, int len, int *copy)
#   void (*remove_session_cb)(SSL_CTX *ctx, SSL_SESSION *sess)
#   void (*info_callback)(const SSL *ssl, int where, int ret)
NEW_SESSION_CB = CFUNCTYPE(c_int, c_void_p, c_void_p)
GET_SESSION_CB = CFUNCTYPE(c_void_p, c_void_p, POINTER(c_ubyte), c_int, POINTER(c_int))
REMOVE_SESSION_CB = CFUNCTYPE(None, c_void_p, c_void_p)
INFO_CB = CFUNCTYPE(None, c_void_p, c_int, c_int)


def _mapped_files() -> list[tuple[int, int, str, str]]:
    """(start, end, perms, path) of this process's mappings, from /proc/self/maps."""
    out = []
    with open("/proc/self/maps", "rb") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 2:
                continue
            lo, _, hi = parts[0].partition(b"-")
            path = parts[5].strip().decode("utf-8", "replace") if len(parts) == 6 else ""
            out.append((int(lo, 16), int(hi, 16), parts[1].decode(), path))
    return out


def _find_libssl_path() -> str:
    """The file of the libssl the loaded ``_ssl`` extension uses.

    Read from this process's own mappings (so we never load a second, different libssl); if more
    than one libssl is mapped, ask ``ldd`` which one ``_ssl`` resolves to.
    """
    # A library replaced on disk while mapped (a libssl3 upgrade under a running daemon) shows as
    # "PATH (deleted)": it is still the loaded one, and dlopen(PATH, RTLD_NOLOAD) finds it by name.
    candidates = sorted({path.removesuffix(" (deleted)") for _, _, _, path in _mapped_files()
                         if os.path.basename(path).startswith("libssl.so")
                         and (path.endswith(" (deleted)") or os.path.exists(path))})
    if not candidates:
        raise ShimError("no shared libssl is mapped: the ssl module is linked statically")
    if len(candidates) == 1:
        return candidates[0]
    ssl_file = getattr(_ssl, "__file__", None)
    if not ssl_file:
        raise ShimError(f"several libssl mapped ({', '.join(candidates)}) and _ssl is built in")
    try:
        ldd = subprocess.run(["ldd", ssl_file], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ShimError(f"several libssl mapped and ldd failed: {exc}") from None
    for line in ldd.splitlines():
        name, _, rest = line.strip().partition(" => ")
        if name.startswith("libssl.so") and rest:
            path = os.path.realpath(rest.split(" (")[0])
            for c in candidates:
                if os.path.realpath(c) == path:
                    return c
    raise ShimError(f"several libssl mapped ({', '.join(candidates)}) and none is the one of {ssl_file}")


class LibSSL:
    """The functions of the already-loaded libssl (and, through its handle, its libcrypto)."""

    def __init__(self, path: str) -> None:
        # RTLD_NOLOAD: only hand back a library that is already in the process; never load one.
        try:
            self.lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_NOW | os.RTLD_LOCAL)
        except OSError as exc:
            raise ShimError(f"{path} is not loaded in this process: {exc}") from None
        self.path = path
        fn = self._fn
        try:
            self.OpenSSL_version_num = fn("OpenSSL_version_num", c_ulong)
            self.SSL_CTX_get_options = fn("SSL_CTX_get_options", c_uint64, c_void_p)
            self.SSL_CTX_get_verify_mode = fn("SSL_CTX_get_verify_mode", c_int, c_void_p)
            self.SSL_CTX_ctrl = fn("SSL_CTX_ctrl", c_long, c_void_p, c_int, c_long, c_void_p)
            self.SSL_CTX_set_timeout = fn("SSL_CTX_set_timeout", c_long, c_void_p, c_long)
            self.SSL_CTX_get_timeout = fn("SSL_CTX_get_timeout", c_long, c_void_p)
            self.SSL_CTX_set_session_id_context = fn("SSL_CTX_set_session_id_context", c_int,
                                                     c_void_p, c_char_p, c_uint)
            self.SSL_CTX_sess_set_new_cb = fn("SSL_CTX_sess_set_new_cb", None, c_void_p, NEW_SESSION_CB)
            self.SSL_CTX_sess_set_get_cb = fn("SSL_CTX_sess_set_get_cb", None, c_void_p, GET_SESSION_CB)
            self.SSL_CTX_sess_set_remove_cb = fn("SSL_CTX_sess_set_remove_cb", None, c_void_p,
                                                 REMOVE_SESSION_CB)
            self.SSL_CTX_sess_get_new_cb = fn("SSL_CTX_sess_get_new_cb", c_void_p, c_void_p)
            self.SSL_CTX_sess_get_get_cb = fn("SSL_CTX_sess_get_get_cb", c_void_p, c_void_p)
            self.SSL_CTX_set_info_callback = fn("SSL_CTX_set_info_callback", None, c_void_p, INFO_CB)
            self.SSL_CTX_get_info_callback = fn("SSL_CTX_get_info_callback", c_void_p, c_void_p)
            self.SSL_get_SSL_CTX = fn("SSL_get_SSL_CTX", c_void_p, c_void_p)
            self.SSL_get_session = fn("SSL_get_session", c_void_p, c_void_p)
            self.SSL_SESSION_get_id = fn("SSL_SESSION_get_id", c_void_p, c_void_p, POINTER(c_uint))
            self.SSL_SESSION_get_timeout = fn("SSL_SESSION_get_timeout", c_long, c_void_p)
            self.SSL_SESSION_free = fn("SSL_SESSION_free", None, c_void_p)
            self.i2d_SSL_SESSION = fn("i2d_SSL_SESSION", c_int, c_void_p, POINTER(POINTER(c_ubyte)))
            self.d2i_SSL_SESSION = fn("d2i_SSL_SESSION", c_void_p, c_void_p, POINTER(POINTER(c_ubyte)),
                                      c_long)
            self.ERR_set_mark = fn("ERR_set_mark", c_int)
            self.ERR_pop_to_mark = fn("ERR_pop_to_mark", c_int)
            self.ERR_peek_last_error = fn("ERR_peek_last_error", c_ulong)
        except AttributeError as exc:
            raise ShimError(f"{path} lacks a function the shim needs: {exc}") from None

    def _fn(self, name: str, restype, *argtypes):
        f = getattr(self.lib, name)
        f.restype = restype
        f.argtypes = argtypes
        return f

    # -- session helpers (only called with pointers OpenSSL gave us) ----------------------------

    def last_error_is_unexpected_eof(self) -> bool:
        """True if the newest error queued is SSL_R_UNEXPECTED_EOF_WHILE_READING (peer closed the
        TCP connection without close_notify), which OpenSSL 3 turns into a fatal decode_error."""
        e = self.ERR_peek_last_error()
        # ERR_GET_LIB / ERR_GET_REASON of OpenSSL 3 (err.h): bit 31 marks a system error.
        return (not e & (1 << 31) and (e >> ERR_LIB_OFFSET) & 0xFF == ERR_LIB_SSL
                and e & ERR_REASON_MASK == SSL_R_UNEXPECTED_EOF_WHILE_READING)

    def session_id(self, sess: int) -> bytes:
        n = c_uint(0)
        p = self.SSL_SESSION_get_id(sess, ctypes.byref(n))
        return ctypes.string_at(p, n.value) if p and n.value else b""

    def session_to_der(self, sess: int) -> bytes:
        size = self.i2d_SSL_SESSION(sess, None)
        if size <= 0:
            return b""
        buf = (c_ubyte * size)()
        cursor = ctypes.cast(buf, POINTER(c_ubyte))  # i2d advances the cursor it is given
        written = self.i2d_SSL_SESSION(sess, ctypes.byref(cursor))
        return bytes(buf[:written]) if written == size else b""

    def session_from_der(self, data: bytes) -> int | None:
        """A new SSL_SESSION* (owned by the caller) or None; leaves OpenSSL's error queue as it was."""
        buf = (c_ubyte * len(data)).from_buffer_copy(data)
        cursor = ctypes.cast(buf, POINTER(c_ubyte))
        self.ERR_set_mark()
        sess = self.d2i_SSL_SESSION(None, ctypes.byref(cursor), len(data))
        # A corrupt entry must not leave errors behind for the handshake in progress to trip on.
        self.ERR_pop_to_mark()
        return sess or None


_LIB: LibSSL | None = None
_LIB_ERROR: ShimError | None = None


def libssl() -> LibSSL:
    """The shim on the process's libssl (found and checked once); raises ShimError."""
    global _LIB, _LIB_ERROR
    if _LIB is not None:
        return _LIB
    if _LIB_ERROR is not None:
        raise _LIB_ERROR
    try:
        lib = LibSSL(_find_libssl_path())
        # Check: the library we hold is the version the ssl module reports (a runtime value).
        if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
            raise ShimError(f"{lib.path} is version 0x{lib.OpenSSL_version_num():x} but the ssl module "
                            f"runs 0x{ssl.OPENSSL_VERSION_NUMBER:x}")
    except ShimError as exc:
        _LIB_ERROR = exc
        raise
    _LIB = lib
    return lib


def _readable_span(ptr: int, length: int) -> bool:
    """True if [ptr, ptr+length) lies in contiguous readable+writable mappings (a heap object)."""
    want = ptr
    for start, end, perms, _ in sorted(_mapped_files()):
        if start <= want < end and perms.startswith("rw"):
            want = end
            if want >= ptr + length:
                return True
    return False


# An SSL_CTX is about 1 KiB in OpenSSL 3.0; the fields we read lie well inside that span.
_SSL_CTX_SPAN = 1024
_VERIFY_MODES = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: SSL_VERIFY_PEER,
                 ssl.CERT_REQUIRED: SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT}


def context_pointer(context: object, lib: LibSSL) -> int:
    """The ``SSL_CTX*`` of a stdlib :class:`ssl.SSLContext`, after checking it; raises ShimError.

    CPython's ``_ssl._SSLContext`` object is ``{PyObject_HEAD; SSL_CTX *ctx; ...}``: the pointer is
    the first field after the object header (``object.__basicsize__`` bytes).  Checks, in order:
    CPython; a real ``_ssl._SSLContext`` (subclasses fine); the pointer is non-NULL and inside
    readable heap memory (so that reading it cannot crash); what OpenSSL reads through it agrees
    with what the ``ssl`` module reports for options, verify mode and minimum version.
    """
    if sys.implementation.name != "cpython":
        raise ShimError(f"the SSLContext layout is only known for CPython, not {sys.implementation.name}")
    if not isinstance(context, _ssl._SSLContext):
        raise ShimError(f"not an ssl.SSLContext but {type(context).__qualname__}")
    header = object.__basicsize__
    if _ssl._SSLContext.__basicsize__ < header + ctypes.sizeof(c_void_p):
        raise ShimError("_ssl._SSLContext is smaller than a header and a pointer")
    ptr = c_void_p.from_address(id(context) + header).value
    return check_context_pointer(context, ptr, lib)


def check_context_pointer(context: ssl.SSLContext, ptr: int | None, lib: LibSSL) -> int:
    """The checks of :func:`context_pointer` on a candidate pointer (split out for tests)."""
    if not ptr:
        raise ShimError("the SSLContext holds no SSL_CTX pointer")
    if not _readable_span(ptr, _SSL_CTX_SPAN):
        raise ShimError(f"0x{ptr:x} is not in readable heap memory")
    got = lib.SSL_CTX_get_options(ptr)
    if got != int(context.options):
        raise ShimError(f"SSL_CTX_get_options gives 0x{got:x}, context.options is 0x{int(context.options):x}")
    got = lib.SSL_CTX_get_verify_mode(ptr)
    if got != _VERIFY_MODES.get(context.verify_mode, -1):
        raise ShimError(f"SSL_CTX_get_verify_mode gives {got}, context.verify_mode is {context.verify_mode!r}")
    got = lib.SSL_CTX_ctrl(ptr, CTRL_GET_MIN_PROTO_VERSION, 0, None)
    want = int(context.minimum_version)
    if got != want and not (got == 0 and want == ssl.TLSVersion.MINIMUM_SUPPORTED):
        raise ShimError(f"minimum protocol version through SSL_CTX is 0x{got:x}, context says 0x{want:x}")
    return ptr
