"""Adding and removing nftables set/map elements over raw nfnetlink: the per-connection hot path.

Hand-written because nothing maintained does this fast enough from Python: libnftables (the `nftables`
module) parses nft text or JSON and refreshes its object cache from the kernel on every call, which costs
0.1-1.5 ms per element operation here (measured, bench/results/repair.md); pyroute2's nftables module cannot
build sets with concatenated keys. The tables, sets, maps and rules themselves are still made with
libnftables (tcpha.steering.flows); this module only sends NEWSETELEM / DESTROYSETELEM messages, in one
nfnetlink batch (one atomic transaction) per call, and waits for the kernel's acknowledgements.

Wire format (linux/netlink.h, linux/netfilter/nfnetlink.h, linux/netfilter/nf_tables.h):
  nlmsghdr(len u32, type u16, flags u16, seq u32, pid u32) + nfgenmsg(family u8, version u8, res_id be16)
  + attributes nlattr(len u16, type u16) padded to 4 bytes.
A batch is BATCH_BEGIN (res_id = NFNL_SUBSYS_NFTABLES) ... BATCH_END. Set element keys of concatenated
types put each field in its own 4-byte-aligned slot (an inet_service takes 2 bytes + 2 bytes of padding).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading

from .netns import call_in_netns

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_CREATE = 0x400
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLA_F_NESTED = 0x8000

NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWSETELEM = 12
NFT_MSG_GETSETELEM = 13
NLM_F_DUMP = 0x300
NFT_MSG_DESTROYSETELEM = 30  # like DELSETELEM, but no error when the element is absent (kernel >= 6.3)

NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_DATA = 2
NFTA_SET_ELEM_TIMEOUT = 4
NFTA_SET_ELEM_USERDATA = 6
NFTA_DATA_VALUE = 1

NFPROTO_NETDEV = 5
NFPROTO_INET = 1

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("!BBH")
_NLATTR = struct.Struct("=HH")
_NLMSGERR = struct.Struct("=i")
_BE64 = struct.Struct("!Q")
_KEY4 = struct.Struct("!4sH2x4sH2x")  # ipv4_addr . inet_service . ipv4_addr . inet_service


class NetlinkError(OSError):
    def __str__(self) -> str:
        return str(self.strerror)


def _attr(kind: int, payload: bytes) -> bytes:
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, kind) + payload + b"\0" * (-length & 3)


def _nest(kind: int, *parts: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(parts))


def flow_key(client_ip: str, client_port: int, vip: str, vport: int) -> bytes:
    """The 16-byte kernel key of an `ipv4_addr . inet_service . ipv4_addr . inet_service` element."""
    return _KEY4.pack(socket.inet_aton(client_ip), client_port, socket.inet_aton(vip), vport)


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


_LIST_PREFIX: dict[tuple[int, str, str], bytes] = {}     # (family, table, set) -> fixed message start


class ElementBatch:
    """Element operations collected for one transaction."""

    __slots__ = ("messages",)

    def __init__(self) -> None:
        self.messages: list[tuple[int, int, bytes]] = []  # (type, flags, payload)

    def _list(self, family: int, table: str, setname: str, elems: list[bytes]) -> bytes:
        prefix = _LIST_PREFIX.get((family, table, setname))
        if prefix is None:
            prefix = (_NFGENMSG.pack(family, 0, 0)
                      + _attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
                      + _attr(NFTA_SET_ELEM_LIST_SET, setname.encode() + b"\0"))
            if len(_LIST_PREFIX) < 64:
                _LIST_PREFIX[(family, table, setname)] = prefix
        return prefix + _nest(NFTA_SET_ELEM_LIST_ELEMENTS, *elems)

    def add(self, family: int, table: str, setname: str,
            elements: list[tuple[bytes, bytes | None, int | None]], userdata: list[bytes] | None = None) -> None:
        """Add (key, data or None, timeout ms or None) elements; an identical existing element is fine.

        ``userdata``, if given, holds one NFTA_SET_ELEM_USERDATA value per element (b"": none)."""
        elems = []
        for key, data, timeout_ms in elements:
            head, data_head, tail = _element_heads(len(key), None if data is None else len(data),
                                                   timeout_ms is not None)
            if data is None:
                elems.append(head + key + tail if timeout_ms is None
                             else head + key + tail + _BE64.pack(timeout_ms))
            elif timeout_ms is None:
                elems.append(head + key + data_head + data + tail)
            else:
                elems.append(head + key + data_head + data + tail + _BE64.pack(timeout_ms))
        if userdata is not None:
            elems = [_with_userdata(elem, udata) for elem, udata in zip(elems, userdata, strict=True)]
        self.messages.append((NFT_MSG_NEWSETELEM, NLM_F_CREATE, self._list(family, table, setname, elems)))

    def destroy(self, family: int, table: str, setname: str, keys: list[bytes]) -> None:
        """Remove elements by key; absent ones are ignored."""
        elems = []
        for k in keys:
            head, _, tail = _element_heads(len(k), None, False)
            elems.append(head + k + tail)
        self.messages.append((NFT_MSG_DESTROYSETELEM, 0, self._list(family, table, setname, elems)))


def _with_userdata(elem: bytes, udata: bytes) -> bytes:
    """An NFTA_LIST_ELEM with an NFTA_SET_ELEM_USERDATA attribute appended (its length grown to match)."""
    if not udata:
        return elem
    extra = _attr(NFTA_SET_ELEM_USERDATA, udata)
    length, kind = _NLATTR.unpack_from(elem)
    return _NLATTR.pack(length + len(extra), kind) + elem[_NLATTR.size:] + extra


# Element user data in libnftnl's layout (TLVs: u8 type, u8 length, value), so that `nft list` shows it:
# type 0 is the element's comment, a NUL-terminated string.
UDATA_SET_ELEM_COMMENT = 0


def comment_userdata(comment: str) -> bytes:
    raw = comment.encode() + b"\0"
    if len(raw) > 255:
        raise ValueError("element comment too long")
    return bytes((UDATA_SET_ELEM_COMMENT, len(raw))) + raw


def userdata_comment(udata: bytes | None) -> str | None:
    """The comment in an element's user data (libnftnl TLVs), or None."""
    pos = 0
    while udata and pos + 2 <= len(udata):
        kind, length = udata[pos], udata[pos + 1]
        value = udata[pos + 2:pos + 2 + length]
        if kind == UDATA_SET_ELEM_COMMENT and len(value) == length:
            return value.rstrip(b"\0").decode("utf-8", "replace")
        pos += 2 + length
    return None


_HEADS: dict[tuple[int, int | None, bool], tuple[bytes, bytes, bytes]] = {}


def _element_heads(klen: int, dlen: int | None, timeout: bool) -> tuple[bytes, bytes, bytes]:
    """The fixed bytes around an element's key, data and timeout, per shape (hot path: one flow's
    element is ~24 attribute headers; built once per shape instead of per element).

    element = head + key + data_head + data + tail [+ 8-byte big-endian timeout]; data_head is
    b"" without data, the padding after key and data is folded into data_head and tail.
    """
    shape = (klen, dlen, timeout)
    heads = _HEADS.get(shape)
    if heads is not None:
        return heads
    kpad = b"\0" * (-klen & 3)
    key_nest = _NLATTR.size * 2 + klen + len(kpad)
    size = _NLATTR.size + key_nest
    if dlen is not None:
        dpad = b"\0" * (-dlen & 3)
        data_nest = _NLATTR.size * 2 + dlen + len(dpad)
        size += data_nest
        data_head = (kpad + _NLATTR.pack(data_nest, NFTA_SET_ELEM_DATA | NLA_F_NESTED)
                     + _NLATTR.pack(_NLATTR.size + dlen, NFTA_DATA_VALUE))
        after = dpad
    else:
        data_head = b""
        after = kpad
    if timeout:
        size += _NLATTR.size + _BE64.size
        after += _NLATTR.pack(_NLATTR.size + _BE64.size, NFTA_SET_ELEM_TIMEOUT)
    head = (_NLATTR.pack(size, NFTA_LIST_ELEM | NLA_F_NESTED)
            + _NLATTR.pack(key_nest, NFTA_SET_ELEM_KEY | NLA_F_NESTED)
            + _NLATTR.pack(_NLATTR.size + klen, NFTA_DATA_VALUE))
    heads = _HEADS[shape] = (head, data_head, after)
    return heads


def _nested_value(data: bytes, pos: int, end: int) -> bytes | None:
    while pos + 4 <= end:
        alen, atype = _NLATTR.unpack_from(data, pos)
        if alen < 4:
            break
        if atype & 0x3FFF == NFTA_DATA_VALUE:
            return bytes(data[pos + 4:pos + alen])
        pos += (alen + 3) & ~3
    return None


def _decode_element(data: bytes, pos: int, end: int, udata: list | None = None) -> tuple[bytes, bytes | None]:
    """(key, data) of one NFTA_LIST_ELEM; its user data appended to ``udata`` if given (None: none)."""
    key: bytes | None = None
    value: bytes | None = None
    user: bytes | None = None
    while pos + 4 <= end:
        alen, atype = _NLATTR.unpack_from(data, pos)
        if alen < 4:
            break
        kind = atype & 0x3FFF
        if kind == NFTA_SET_ELEM_KEY:
            key = _nested_value(data, pos + 4, pos + alen)
        elif kind == NFTA_SET_ELEM_DATA:
            value = _nested_value(data, pos + 4, pos + alen)
        elif kind == NFTA_SET_ELEM_USERDATA:
            user = bytes(data[pos + 4:pos + alen])
        pos += (alen + 3) & ~3
    if udata is not None:
        udata.append(user)
    return key or b"", value


def _messages(data: bytes):
    """(offset, length, type, seq) of each netlink message in one datagram."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            return
        yield offset, length, kind, seq
        offset += (length + 3) & ~3


class ElementSocket:
    """An nfnetlink socket (in one namespace) that runs element batches. Thread-safe."""

    def __init__(self, netns: str | None = None):
        self._sock = call_in_netns(netns, self._open)
        self._seq = 0
        self._lock = threading.Lock()
        self._portid = self._sock.getsockname()[0]

    @staticmethod
    def _open() -> socket.socket:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        s.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # errors without a copy of our request
        s.bind((0, 0))
        return s

    def close(self) -> None:
        self._sock.close()

    def run(self, batch: ElementBatch) -> None:
        """Send the batch as one transaction; raise NetlinkError with the kernel's errno if it failed."""
        if not batch.messages:
            return
        with self._lock:
            seq = self._seq
            self._seq = (seq + len(batch.messages) + 2) & 0x7FFFFFFF
            parts = [_NLMSGHDR.pack(_NLMSGHDR.size + _NFGENMSG.size, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0),
                     _NFGENMSG.pack(0, 0, NFNL_SUBSYS_NFTABLES)]
            first = seq + 1
            for i, (kind, flags, payload) in enumerate(batch.messages):
                parts.append(_NLMSGHDR.pack(_NLMSGHDR.size + len(payload), (NFNL_SUBSYS_NFTABLES << 8) | kind,
                                            NLM_F_REQUEST | NLM_F_ACK | flags, first + i, 0))
                parts.append(payload)
            last = first + len(batch.messages) - 1
            parts.append(_NLMSGHDR.pack(_NLMSGHDR.size + _NFGENMSG.size, NFNL_MSG_BATCH_END, NLM_F_REQUEST,
                                        last + 1, 0))
            parts.append(_NFGENMSG.pack(0, 0, NFNL_SUBSYS_NFTABLES))
            self._sock.send(b"".join(parts))
            self._wait_acks(first, last)

    def _wait_acks(self, first: int, last: int) -> None:
        # One NLMSG_ERROR (error 0 = ack) per message that asked for it. The kernel handles the batch inside
        # our send() call, so every answer is queued once send() returns. When the transaction fails, the
        # kernel reports the failing message(s) (and may skip acks for others); nothing of it is applied.
        pending = set(range(first, last + 1))
        error = 0
        while pending:
            if error and not self._more_waiting():
                break
            data = self._sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    break
                if kind == NLMSG_ERROR and seq in pending:
                    code = -_NLMSGERR.unpack_from(data, offset + _NLMSGHDR.size)[0]
                    pending.discard(seq)
                    if code and not error:
                        error = code
                offset += (length + 3) & ~3
        if error:
            raise NetlinkError(error, f"nftables: {os.strerror(error)}")

    def dump_elements(self, family: int, table: str, setname: str, *, keys: bool = True
                      ) -> tuple[int, list[tuple[bytes, bytes | None]]]:
        """(count, [(key, data or None)]) of a set or map, read with one netlink dump.

        keys=False only counts (no per-element decoding: fast even for 100k elements).
        """
        request = (_NFGENMSG.pack(family, 0, 0)
                   + _attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
                   + _attr(NFTA_SET_ELEM_LIST_SET, setname.encode() + b"\0"))
        count = 0
        out: list[tuple[bytes, bytes | None]] = []
        with self._lock:
            seq = self._seq
            self._seq = (seq + 1) & 0x7FFFFFFF
            self._sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(request), (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM,
                                           NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + request)
            while True:
                data = self._sock.recv(1 << 20)
                for offset, length, kind, mseq in _messages(data):
                    end = offset + length
                    if mseq == seq:
                        if kind == NLMSG_DONE:
                            return count, out
                        if kind == NLMSG_ERROR:
                            code = -_NLMSGERR.unpack_from(data, offset + _NLMSGHDR.size)[0]
                            if code:
                                raise NetlinkError(code, f"nftables: {os.strerror(code)}")
                        else:
                            n = self._parse_elements(data, offset + _NLMSGHDR.size + _NFGENMSG.size, end,
                                                     out if keys else None)
                            count += n

    def get_userdata(self, family: int, table: str, setname: str, keys: list[bytes]) -> list[bytes | None | bool]:
        """Per key, the user data of its element (None: it has none), or False when there is no element.

        One NFT_MSG_GETSETELEM (not a dump) per key, all sent in one datagram; each is answered with the
        element or ENOENT, then its acknowledgement."""
        if not keys:
            return []
        prefix = (_NFGENMSG.pack(family, 0, 0) + _attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
                  + _attr(NFTA_SET_ELEM_LIST_SET, setname.encode() + b"\0"))
        kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM
        results: dict[int, bytes | None | bool] = {}
        with self._lock:
            first = self._seq
            self._seq = (first + len(keys)) & 0x7FFFFFFF
            parts = []
            for i, key in enumerate(keys):
                head, _, tail = _element_heads(len(key), None, False)
                payload = prefix + _nest(NFTA_SET_ELEM_LIST_ELEMENTS, head + key + tail)
                parts.append(_NLMSGHDR.pack(_NLMSGHDR.size + len(payload), kind, NLM_F_REQUEST | NLM_F_ACK,
                                            first + i, 0) + payload)
            self._sock.send(b"".join(parts))
            pending = set(range(first, first + len(keys)))
            error = 0
            while pending:
                data = self._sock.recv(1 << 16)
                for offset, length, mkind, seq in _messages(data):
                    if seq in pending:
                        if mkind == NLMSG_ERROR:
                            code = -_NLMSGERR.unpack_from(data, offset + _NLMSGHDR.size)[0]
                            pending.discard(seq)
                            if code == errno.ENOENT:
                                results[seq] = False
                            elif code and not error:
                                error = code
                        else:
                            udata: list = []
                            self._parse_elements(data, offset + _NLMSGHDR.size + _NFGENMSG.size,
                                                 offset + length, [], udata)
                            results[seq] = udata[0] if udata else None
        if error:
            raise NetlinkError(error, f"nftables: {os.strerror(error)}")
        return [results.get(first + i, False) for i in range(len(keys))]

    @staticmethod
    def _parse_elements(data: bytes, pos: int, end: int, out: list | None, udata: list | None = None) -> int:
        count = 0
        while pos + 4 <= end:
            alen, atype = _NLATTR.unpack_from(data, pos)
            if alen < 4:
                break
            if atype & 0x3FFF == NFTA_SET_ELEM_LIST_ELEMENTS:
                p, stop = pos + 4, pos + alen
                while p + 4 <= stop:
                    elen, _etype = _NLATTR.unpack_from(data, p)
                    if elen < 4:
                        break
                    count += 1
                    if out is not None:
                        out.append(_decode_element(data, p + 4, p + elen, udata))
                    p += (elen + 3) & ~3
            pos += (alen + 3) & ~3
        return count

    def _more_waiting(self) -> bool:
        try:
            self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        return True


__all__ = ["ElementBatch", "ElementSocket", "NetlinkError", "flow_key", "mac_bytes", "comment_userdata",
           "userdata_comment", "NFPROTO_NETDEV", "NFPROTO_INET"]
