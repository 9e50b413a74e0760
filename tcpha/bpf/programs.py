"""The relay's two sk_skb programs and the maps they use, assembled with tcpha.bpf.asm.

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

from tcpha.bpf import asm
from tcpha.bpf.asm import R0, R1, R2, R3, R4, R6, R10

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
