"""TLS on distcache links (an extension: the original speaks plaintext only).

The wire format inside TLS is the original's, unchanged.  The settings use stunnel's words, as
single-dash options of the distcache tools (``-tls-`` + the stunnel word in lower case):

==================  ========================  ===================================================
option              stunnel                   meaning
==================  ========================  ===================================================
``-tls-cafile F``   ``CAfile`` +              client: the CAs that may sign the server's
                    ``verifyChain = yes``     certificate (TLS is on; the chain is always
                                              checked).  server: client certificates are
                                              required and must chain to these CAs.
``-tls-cert F``     ``cert``                  server: its certificate (TLS is on).  client: the
                                              certificate it presents (with ``-tls-cafile``).
``-tls-key F``      ``key``                   the private key of ``-tls-cert`` (default: the key
                                              is in the ``-tls-cert`` file, as stunnel)
``-tls-checkhost N``  ``checkHost``           client: the name the server's certificate must
                                              carry (default: the host of an ``IP:host:port``
                                              address; a ``UNIX:``/``FD:`` address is checked
                                              for the chain only unless this is given)
==================  ========================  ===================================================

There is no way to switch certificate checks off (stunnel's ``verifyChain = no``, redis-cli's
``--insecure``): a client without ``-tls-cafile`` does not speak TLS at all.  Files are read when
the context is made (before a daemon drops its privileges), so a key readable by root only works.
"""

from __future__ import annotations

import re
import socket
import ssl
from dataclasses import dataclass

from .address import Address

__all__ = ["TlsError", "TlsOptions", "ClientTls", "server_context", "describe_error", "CLIENT_OPTIONS"]

# A client tool's options (dc_test, dc_snoop; dc_client has them in its settings table) -> TlsOptions field.
CLIENT_OPTIONS = {"-tls-cafile": "cafile", "-tls-cert": "cert", "-tls-key": "key", "-tls-checkhost": "checkhost"}


class TlsError(ValueError):
    """A TLS setting that cannot be used; str(e) is one line in the original's option-error style."""


@dataclass(frozen=True)
class TlsOptions:
    """The four settings, as given (file names, or None)."""
    cafile: str | None = None
    cert: str | None = None
    key: str | None = None
    checkhost: str | None = None

    def any(self) -> bool:
        return any((self.cafile, self.cert, self.key, self.checkhost))


def _invalid(opt: str, value: str, why: str) -> TlsError:
    return TlsError(f"Error, {opt} given an invalid argument ('{value}': {why})")


def _readable(opt: str, path: str) -> None:
    try:
        with open(path, "rb") as fp:
            fp.read(1)
    except OSError as exc:
        raise _invalid(opt, path, exc.strerror or str(exc)) from None


def _ssl_reason(exc: Exception) -> str:
    """OpenSSL's reason in words ("key values mismatch"), without the "[SSL]" and "(_ssl.c:N)" noise."""
    reason = getattr(exc, "reason", None)
    if reason:
        return reason.replace("_", " ").lower()
    text = re.sub(r"^\[[^\]]*\]\s*|\s*\(_ssl\.c:\d+\)$", "", str(getattr(exc, "strerror", None) or exc))
    return "not in PEM format" if text == "PEM lib" else text


def _load_chain(ctx: ssl.SSLContext, o: TlsOptions) -> None:
    assert o.cert is not None
    _readable("-tls-cert", o.cert)
    if o.key is not None:
        _readable("-tls-key", o.key)
    try:
        ctx.load_cert_chain(o.cert, o.key)
    except ssl.SSLError as exc:
        opt, value = ("-tls-key", o.key) if o.key is not None else ("-tls-cert", o.cert)
        raise _invalid(opt, value, f"not a usable certificate and key: {_ssl_reason(exc)}") from None


def _load_cafile(ctx: ssl.SSLContext, cafile: str) -> None:
    _readable("-tls-cafile", cafile)
    try:
        ctx.load_verify_locations(cafile=cafile)
    except ssl.SSLError as exc:
        raise _invalid("-tls-cafile", cafile, f"no usable CA certificate: {_ssl_reason(exc)}") from None


def server_context(o: TlsOptions) -> ssl.SSLContext | None:
    """The listener's context, or None when no TLS option is given.  Raises TlsError."""
    if not o.any():
        return None
    if o.checkhost is not None:
        raise TlsError("Error, -tls-checkhost is for clients (dc_client, dc_test)")
    if o.cert is None:
        raise TlsError("Error, -tls-cafile and -tls-key need -tls-cert (the server's certificate)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, o)
    if o.cafile is not None:
        _load_cafile(ctx, o.cafile)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class ClientTls:
    """A client's TLS: the context for an address and the name to check (see the module text)."""

    def __init__(self, o: TlsOptions) -> None:
        if o.cafile is None:
            raise TlsError("Error, -tls-cert, -tls-key and -tls-checkhost need -tls-cafile "
                           "(the CAs the server's certificate must chain to)")
        if o.key is not None and o.cert is None:
            raise TlsError("Error, -tls-key needs -tls-cert")
        self.options = o
        self._named = self._context(o, check_hostname=True)
        self._chain_only = self._context(o, check_hostname=False)

    @classmethod
    def from_options(cls, o: TlsOptions) -> "ClientTls | None":
        """None when no TLS option is given (plaintext, as the original)."""
        return cls(o) if o.any() else None

    @staticmethod
    def _context(o: TlsOptions, *, check_hostname: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # CERT_REQUIRED
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = check_hostname
        _load_cafile(ctx, o.cafile)  # type: ignore[arg-type]
        if o.cert is not None:
            _load_chain(ctx, o)
        return ctx

    def for_address(self, addr: Address) -> tuple[ssl.SSLContext, str]:
        """(context, server name) for a connection to ``addr``; an empty name: chain check only."""
        name = self.options.checkhost or (addr.host if addr.kind == "ip" and addr.host else None)
        if name is None:
            return self._chain_only, ""
        return self._named, name

    def wrap(self, sock: socket.socket, addr: Address) -> ssl.SSLSocket:
        """A blocking socket wrapped and its handshake done (the socket's timeout applies);
        raises ssl.SSLError (an OSError) when the server's certificate does not check out."""
        ctx, name = self.for_address(addr)
        try:
            return ctx.wrap_socket(sock, server_hostname=name or None)
        except BaseException:
            sock.close()
            raise


def describe_error(exc: BaseException) -> str:
    """One line for a failed TLS connection (the verify message when there is one)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {_ssl_reason(exc)}"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__

