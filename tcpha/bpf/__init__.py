"""eBPF for tcpha: a small assembler (asm), the bpf(2) calls (syscall), the programs (programs) and the
back end's in-kernel relay (relay). See docs/kernel.md, "The BPF relay"."""
