"""Sessions sealed before they reach any cache: AES-256-GCM under a key shared by the back ends.

A serialised TLS session (i2d_SSL_SESSION) holds its master secret: whoever reads it can decrypt every
connection that resumes it. distcache carries and stores its data opaquely (`dc_server -persist`
writes it to disk, the Redis backends keep it in memory, in RDB/AOF files and on replicas), so the
back ends seal each session themselves before the ADD and open it after the GET; no cache server,
file, dump or replica ever holds a usable session. The distcache wire format is unchanged.

A sealed record (bytes):

    "tcS1" | key id (4) | nonce (12) | AES-256-GCM ciphertext of the session | tag (16)

* key id: the first 4 bytes of SHA-256 over the key, so a reader picks the key without trying each.
* nonce: 96 random bits per record (NIST SP 800-38D §8.2.2: random nonces are safe up to 2^32
  records under one key; a cache holds far fewer live sessions, and rotation resets the count).
* associated data: "tcS1" | key id | the session id. Authenticating the session id binds a record to
  the id it was stored under: a record moved to another id (by anyone with write access to the
  cache) fails to open, as does any flipped bit, a record sealed with a key this server does not
  hold, and an unsealed (plaintext) record. Every such failure is a miss: a full handshake, never a
  resumption of a session the back ends did not seal.

The key file holds one key per line, 64 hex digits (32 random bytes; `tcpha-keygen PATH` writes one),
`#` comments allowed. The first key seals; every key opens. Rotation: put a new key on the first line
of every back end's file and reload them (SIGHUP); once the old sessions have expired
(`sessiontimeout`), drop the old line.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from tcpha.secretfile import read_secret_file

__all__ = ["SessionSealer", "SessionKeyError", "SessionKeyFile", "read_session_keys", "session_key_file",
           "SEAL_OVERHEAD"]

MAGIC = b"tcS1"
KEY_BYTES = 32          # AES-256
KEY_ID_BYTES = 4
NONCE_BYTES = 12
TAG_BYTES = 16
SEAL_OVERHEAD = len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES + TAG_BYTES     # 36 bytes per record


class SessionKeyError(ValueError):
    """An unusable session key file; the message is one line naming the file (and line)."""


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:KEY_ID_BYTES]


def read_session_keys(path: str) -> list[bytes]:
    """The keys of a session key file, sealing key first; SessionKeyError (one line) if unusable.

    Refused like an authkey file: unreadable, not a regular file, any access for group or others
    (the keys protect every session's master secret), and any line that is not 64 hex digits.
    """
    try:
        data = read_secret_file(path, "session key file")
    except ValueError as exc:
        raise SessionKeyError(str(exc)) from None
    keys: list[bytes] = []
    for lineno, raw in enumerate(data.decode("ascii", "replace").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            key = bytes.fromhex(line)
        except ValueError:
            key = b""
        if len(key) != KEY_BYTES:
            raise SessionKeyError(f"{path}:{lineno}: a session key is {2 * KEY_BYTES} hex digits "
                                  f"(tcpha-keygen writes one)")
        if key in keys:
            raise SessionKeyError(f"{path}:{lineno}: the same key twice")
        keys.append(key)
    if not keys:
        raise SessionKeyError(f"session key file {path} holds no key (tcpha-keygen writes one)")
    return keys


@dataclass(frozen=True)
class SessionKeyFile:
    """The `sessionkeys` setting's value: the file and the keys read from it when the configuration was
    loaded. Equal only when both are, so a reload (SIGHUP) that finds new keys under the same path
    applies them (rotation), and one that finds the same keys changes nothing."""

    path: str
    keys: tuple[bytes, ...]

    def sealer(self) -> "SessionSealer":
        return SessionSealer(self.keys, source=self.path)

    def __repr__(self) -> str:          # never the keys, in logs or config dumps
        return f"SessionKeyFile({self.path!r}, {len(self.keys)} key(s))"

    def __str__(self) -> str:
        return self.path


def session_key_file(text: str) -> SessionKeyFile | None:
    """The settings-table type of `sessionkeys`: none, or a key file read and checked now (a config
    error names the file and line)."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return None
    return SessionKeyFile(text, tuple(read_session_keys(text)))


@dataclass(frozen=True)
class SessionSealer:
    """Seals and opens session records (module docstring). `keys[0]` seals; all keys open."""

    keys: tuple[bytes, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if not self.keys or any(len(k) != KEY_BYTES for k in self.keys):
            raise SessionKeyError(f"session keys must be {KEY_BYTES} bytes each, at least one")
        # cryptography's AESGCM: the field's own AEAD binding to OpenSSL (no hand-written crypto).
        # lazy: ~35 ms to import, and every process loads this module (tcpha.config.types); only sealing pays
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        object.__setattr__(self, "_by_id", {_key_id(k): AESGCM(k) for k in self.keys})
        object.__setattr__(self, "_sealing_id", _key_id(self.keys[0]))

    @classmethod
    def from_file(cls, path: str) -> "SessionSealer":
        return cls(tuple(read_session_keys(path)), source=path)

    def seal(self, session_id: bytes, data: bytes) -> bytes:
        header = MAGIC + self._sealing_id                       # type: ignore[attr-defined]
        nonce = os.urandom(NONCE_BYTES)
        aead = self._by_id[self._sealing_id]                    # type: ignore[attr-defined]
        return header + nonce + aead.encrypt(nonce, data, header + session_id)

    def open(self, session_id: bytes, record: bytes) -> bytes | None:
        """The session bytes, or None for anything this server must not use (see the module doc)."""
        # lazy: cryptography is imported only where sessions are sealed (see __post_init__)
        from cryptography.exceptions import InvalidTag
        if len(record) < SEAL_OVERHEAD or not record.startswith(MAGIC):
            return None
        header = record[:len(MAGIC) + KEY_ID_BYTES]
        aead = self._by_id.get(header[len(MAGIC):])             # type: ignore[attr-defined]
        if aead is None:
            return None
        nonce = record[len(header):len(header) + NONCE_BYTES]
        try:
            return aead.decrypt(nonce, record[len(header) + NONCE_BYTES:], header + session_id)
        except InvalidTag:
            return None

    def __repr__(self) -> str:
        return f"SessionSealer({len(self.keys)} key(s){' from ' + self.source if self.source else ''})"
