"""A small eBPF assembler: the few instructions tcpha's programs need, each encoded as the kernel reads it.

An instruction is 8 bytes, `struct bpf_insn` of include/uapi/linux/bpf.h:

    u8 code     operation: class (low 3 bits) | size or source (bit 3) | operation (high 4 bits)
    u8 regs     dst register (low nibble) | src register (high nibble)
    s16 off     memory or jump offset (jumps: in instructions, counted from the next one)
    s32 imm     immediate

`ld_imm64` (a 64-bit constant, or a map's file descriptor that the verifier turns into the map's address)
takes two slots. Registers: r0 return value / helper result, r1-r5 helper arguments (clobbered by calls),
r6-r9 kept across calls, r10 read-only frame pointer (the stack grows down from it, 512 bytes).
"""

from __future__ import annotations

import struct

R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)

# instruction classes
_LD, _LDX, _ST, _STX, _ALU, _JMP, _JMP32, _ALU64 = range(8)
# sizes (load/store)
_W, _H, _B, _DW = 0x00, 0x08, 0x10, 0x18
SIZES = {4: _W, 2: _H, 1: _B, 8: _DW}
# source of the second operand: immediate or register
_K, _X = 0x00, 0x08
# ALU operations
_ADD, _MOV = 0x00, 0xb0
# jump operations
_JA, _JEQ, _JNE, _CALL, _EXIT = 0x00, 0x10, 0x50, 0x80, 0x90
_IMM, _MEM = 0x00, 0x60
PSEUDO_MAP_FD = 1                    # ld_imm64 src register value: imm is a map fd


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def mov(dst: int, src: int) -> bytes:
    """dst = src (64 bit)"""
    return _insn(_ALU64 | _MOV | _X, dst, src)


def mov_imm(dst: int, imm: int) -> bytes:
    """dst = imm (sign-extended 32-bit immediate)"""
    return _insn(_ALU64 | _MOV | _K, dst, imm=imm)


def add_imm(dst: int, imm: int) -> bytes:
    """dst += imm"""
    return _insn(_ALU64 | _ADD | _K, dst, imm=imm)


def load(size: int, dst: int, src: int, off: int) -> bytes:
    """dst = *(u<size*8> *)(src + off)"""
    return _insn(_LDX | _MEM | SIZES[size], dst, src, off)


def store(size: int, dst: int, off: int, src: int) -> bytes:
    """*(u<size*8> *)(dst + off) = src"""
    return _insn(_STX | _MEM | SIZES[size], dst, src, off)


def jeq_imm(dst: int, imm: int, off: int) -> bytes:
    """if dst == imm: skip `off` instructions"""
    return _insn(_JMP | _JEQ | _K, dst, off=off, imm=imm)


def call(helper: int) -> bytes:
    """r0 = helper(r1, ..., r5)"""
    return _insn(_JMP | _CALL, imm=helper)


def exit_() -> bytes:
    """return r0"""
    return _insn(_JMP | _EXIT)


def ld_map_fd(dst: int, fd: int) -> bytes:
    """dst = the map whose file descriptor is fd (two instruction slots)"""
    return _insn(_LD | _IMM | _DW, dst, PSEUDO_MAP_FD, imm=fd) + _insn(0)


def count(code: bytes) -> int:
    """Number of instruction slots in assembled code."""
    assert len(code) % 8 == 0
    return len(code) // 8
