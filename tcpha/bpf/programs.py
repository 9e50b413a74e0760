"""The relay's two sk_skb programs (and, at the end, the front end's tc steering program) and the maps they use, assembled with tcpha.bpf.asm.

Maps (one set per process, shared by all its relays):
- `socks` (SOCKHASH, key: socket cookie u64): every relayed socket. Inserting a socket attaches the
  programs below to it: from then on the kernel hands each segment it receives to the verdict program
  instead of the socket's receive queue.
- `peers` (HASH, cookie u64 -> cookie u64): "what arrives on this socket leaves through that one".
  A socket without an entry keeps its bytes for userspace (verdict SK_PASS), which is how a relay keeps
  one direction visible (BpfRelay(kernel_up=False)).

Programs:
- parser (stream parser): every segment is one message: `return skb->len`.
- verdict (stream verdict, or skb verdict without parser):

      cookie = bpf_get_socket_cookie(skb)            ; the receiving socket
      peer = peers[cookie]                           ; map lookup; none -> SK_PASS (userspace reads it)
      return bpf_sk_redirect_hash(skb, socks, &peer, 0)  ; flags 0: send it out of the peer socket
"""

from __future__ import annotations

import struct

from tcpha.bpf import asm
from tcpha.bpf.asm import R0, R1, R2, R3, R4, R5, R6, R7, R10

HELPER_MAP_LOOKUP_ELEM = 1
HELPER_GET_SOCKET_COOKIE = 46
HELPER_SK_REDIRECT_HASH = 72
SK_DROP, SK_PASS = 0, 1
SKB_LEN = 0                          # offsetof(struct __sk_buff, len)


def parser() -> bytes:
    return asm.load(4, R0, R1, SKB_LEN) + asm.exit_()


def verdict(peers_fd: int, socks_fd: int) -> bytes:
    lookup_failed = [
        asm.mov_imm(R0, SK_PASS),
        asm.exit_(),
    ]
    redirect = [
        asm.load(8, R1, R0, 0),                     # r1 = peer cookie (map value)
        asm.store(8, R10, -16, R1),                 # on the stack: helpers take keys by pointer
        asm.mov(R1, R6),                            # skb
        asm.ld_map_fd(R2, socks_fd),
        asm.mov(R3, R10),
        asm.add_imm(R3, -16),                       # &peer
        asm.mov_imm(R4, 0),                         # flags: egress of the peer socket
        asm.call(HELPER_SK_REDIRECT_HASH),          # SK_PASS when queued to the peer, SK_DROP if it is gone
        asm.exit_(),
    ]
    head = [
        asm.mov(R6, R1),                            # keep skb across calls
        asm.call(HELPER_GET_SOCKET_COOKIE),         # r0 = cookie of the receiving socket
        asm.store(8, R10, -8, R0),
        asm.ld_map_fd(R1, peers_fd),
        asm.mov(R2, R10),
        asm.add_imm(R2, -8),
        asm.call(HELPER_MAP_LOOKUP_ELEM),           # r0 = &peers[cookie] or NULL
        asm.jeq_imm(R0, 0, sum(asm.count(i) for i in redirect)),
    ]
    return b"".join(head + redirect + lookup_failed)


# -- the front end's flow steering (tc ingress, cls_bpf direct-action) ---------------------------------
# `flows` (HASH, 16-byte key, FLOW_VALUE): the key is tcpha.steering.FlowKey.key(), client ip, client port,
# VIP, port, each in a 4-byte slot, network order; the value:
#
#     u64 last_seen    bpf_ktime_get_ns() (CLOCK_MONOTONIC) of the last forwarded packet, or of the
#                      update from userspace; the sweeper expires idle entries by it
#     u64 handoff      the id of the handoff that made the entry (0: none)
#     u32 state        FLOW_FROZEN (drop) or FLOW_FORWARD
#     u32 ifindex      forward: the interface whose egress the frame is redirected to
#     u8  macs[12]     forward: destination MAC (the back end's) then source MAC (the interface's own)
#
# The program, for each frame received on the interface:
#
#     not IPv4/TCP, or a non-first fragment, or no flows[key]   -> TC_ACT_UNSPEC (on to the stack)
#     SYN set: delete flows[key]                                -> TC_ACT_UNSPEC (a new connection is the FE's)
#     FLOW_FROZEN                                               -> TC_ACT_SHOT (the client retransmits)
#     FLOW_FORWARD: last_seen = now; rewrite both MACs; bpf_redirect(ifindex, egress)
#
# exactly what the nft table of tcpha.steering.flows does (no TTL or checksum change: only the MACs).
#
# With a tunnel (steering(flows_fd, tunnel_id=VNI), `tunnel = vxlan|ipip`), the entry's ifindex is a
# collect-metadata tunnel device (tcpha.steering.tunnel) and its last 4 bytes hold the back end's IPv4
# address (host order, as bpf_tunnel_key wants it); before the redirect the program sets the packet's
# tunnel key: bpf_skb_set_tunnel_key(skb, {tunnel_id, remote_ipv4, ttl 64}, 28, 0). The device then
# encapsulates (vxlan: the whole frame, whose destination MAC is the back ends' fixed tunnel MAC; ipip: a
# redirect to an L3 device drops the Ethernet header) and the outer packet is routed to the back end.
HELPER_MAP_DELETE_ELEM = 3
HELPER_KTIME_GET_NS = 5
HELPER_SKB_STORE_BYTES = 9
HELPER_SKB_SET_TUNNEL_KEY = 21
HELPER_REDIRECT = 23
HELPER_SKB_LOAD_BYTES = 26
TC_ACT_UNSPEC, TC_ACT_SHOT = -1, 2
FLOW_FROZEN, FLOW_FORWARD = 0, 1
FLOW_KEY_SIZE = 16
FLOW_VALUE = struct.Struct("<QQII6s6sI")      # last_seen, handoff, state, ifindex, dst MAC, src MAC, tunnel remote
_LAST, _STATE, _IFINDEX, _MACS, _REMOTE = 0, 16, 20, 24, 36
TUNNEL_KEY_SIZE = 28                            # struct bpf_tunnel_key up to tunnel_label (no local address)
TUNNEL_TTL = 64
# stack layout (offsets from r10): Ethernet + IPv4 header (34 bytes) at -58 so that the addresses are
# 4-byte aligned; the first 16 bytes of the TCP header at -80; the key at -16; the tunnel key at -112.
_ETH, _TCP, _KEY, _TUN = -58, -80, -16, -112


def _set_tunnel_key(tunnel_id: int) -> list:
    """bpf_skb_set_tunnel_key(skb, &key, 28, 0) with key = {tunnel_id, entry's remote, ttl}; r7 = entry."""
    return [
        asm.mov_imm(R1, tunnel_id), asm.store(4, R10, _TUN, R1),            # tunnel_id (host order)
        asm.load(4, R1, R7, _REMOTE), asm.store(4, R10, _TUN + 4, R1),      # remote_ipv4 (host order)
        asm.mov_imm(R1, 0),
        asm.store(4, R10, _TUN + 8, R1), asm.store(4, R10, _TUN + 12, R1), asm.store(4, R10, _TUN + 16, R1),
        asm.mov_imm(R2, TUNNEL_TTL << 8), asm.store(4, R10, _TUN + 20, R2),  # tos 0, ttl, tunnel_ext 0
        asm.store(4, R10, _TUN + 24, R1),                                    # tunnel_label
        asm.mov(R1, R6), asm.mov(R2, R10), asm.add_imm(R2, _TUN), asm.mov_imm(R3, TUNNEL_KEY_SIZE),
        asm.mov_imm(R4, 0),
        asm.call(HELPER_SKB_SET_TUNNEL_KEY),
        asm.Jump("drop", asm.jne_imm, R0, 0),
    ]


def steering(flows_fd: int, tunnel_id: int | None = None) -> bytes:
    """The tc steering program; with tunnel_id, forwarded flows leave through a tunnel (see above)."""
    J = asm.Jump
    tunnel = _set_tunnel_key(tunnel_id) if tunnel_id is not None else []
    return asm.assemble([
        asm.mov(R6, R1),                                    # skb, kept across calls
        asm.mov(R1, R6), asm.mov_imm(R2, 0), asm.mov(R3, R10), asm.add_imm(R3, _ETH), asm.mov_imm(R4, 34),
        asm.call(HELPER_SKB_LOAD_BYTES),                    # Ethernet + IPv4 header onto the stack
        J("pass", asm.jne_imm, R0, 0),
        asm.load(2, R1, R10, _ETH + 12),                    # ethertype, network order read little-endian
        J("pass", asm.jne_imm, R1, 0x0008),                 # not IPv4
        asm.load(1, R1, R10, _ETH + 14),                    # version | IHL
        asm.mov(R2, R1), asm.rsh_imm(R2, 4),
        J("pass", asm.jne_imm, R2, 4),
        asm.load(1, R2, R10, _ETH + 23),                    # protocol
        J("pass", asm.jne_imm, R2, 6),                      # not TCP
        asm.load(2, R2, R10, _ETH + 20),                    # flags | fragment offset
        asm.and_imm(R2, 0xff1f),                            # the offset (little-endian view)
        J("pass", asm.jne_imm, R2, 0),                      # a later fragment: no TCP header in it
        asm.and_imm(R1, 0x0f), asm.lsh_imm(R1, 2), asm.add_imm(R1, 14),   # TCP header offset
        asm.mov(R2, R1), asm.mov(R1, R6), asm.mov(R3, R10), asm.add_imm(R3, _TCP), asm.mov_imm(R4, 16),
        asm.call(HELPER_SKB_LOAD_BYTES),
        J("pass", asm.jne_imm, R0, 0),
        asm.load(4, R1, R10, _ETH + 26), asm.store(4, R10, _KEY, R1),        # client ip
        asm.load(2, R1, R10, _TCP), asm.store(4, R10, _KEY + 4, R1),         # client port (+2 zero bytes)
        asm.load(4, R1, R10, _ETH + 30), asm.store(4, R10, _KEY + 8, R1),    # VIP
        asm.load(2, R1, R10, _TCP + 2), asm.store(4, R10, _KEY + 12, R1),    # port
        asm.ld_map_fd(R1, flows_fd), asm.mov(R2, R10), asm.add_imm(R2, _KEY),
        asm.call(HELPER_MAP_LOOKUP_ELEM),
        J("pass", asm.jeq_imm, R0, 0),
        asm.mov(R7, R0),                                    # the entry, kept across calls
        asm.load(1, R1, R10, _TCP + 13), asm.and_imm(R1, 0x02),
        J("syn", asm.jne_imm, R1, 0),
        asm.load(4, R1, R7, _STATE),
        J("drop", asm.jne_imm, R1, FLOW_FORWARD),
        asm.call(HELPER_KTIME_GET_NS), asm.store(8, R7, _LAST, R0),
        asm.mov(R1, R6), asm.mov_imm(R2, 0), asm.mov(R3, R7), asm.add_imm(R3, _MACS), asm.mov_imm(R4, 12),
        asm.mov_imm(R5, 0),
        asm.call(HELPER_SKB_STORE_BYTES),
        J("drop", asm.jne_imm, R0, 0),
        *tunnel,
        asm.load(4, R1, R7, _IFINDEX), asm.mov_imm(R2, 0),  # flags 0: the egress of ifindex
        asm.call(HELPER_REDIRECT),                          # TC_ACT_REDIRECT
        asm.exit_(),
        "syn",
        asm.ld_map_fd(R1, flows_fd), asm.mov(R2, R10), asm.add_imm(R2, _KEY),
        asm.call(HELPER_MAP_DELETE_ELEM),
        "pass",
        asm.mov_imm(R0, TC_ACT_UNSPEC), asm.exit_(),
        "drop",
        asm.mov_imm(R0, TC_ACT_SHOT), asm.exit_(),
    ])
