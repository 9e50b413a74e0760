"""The one place the front end's steering implementation is chosen (`steering = auto|bpf|nft`).

- nft: tcpha.steering.flows.FlowSteering (an nftables netdev table);
- bpf: tcpha.steering.bpf.BpfFlowSteering (a tc ingress BPF program and hash map);
- auto: bpf when this kernel loads the steering program (checked once, at start), else nft.

Both have the same interface and survive a front-end kill -9 (the next process adopts the kernel state).
auto keeps nft when a predecessor's nft table is there (it adopts it, flows and all). Switching kinds
explicitly across a restart leaves the other kind's flows to its own kernel object until their
flowtimeout (tc ingress runs before the nft ingress hook; both see the packets).
"""

from __future__ import annotations

import logging
from typing import Any

from tcpha.loglevels import NOTICE

from .bpf import BpfFlowSteering, bpf_steering_possible
from .flows import FlowSteering, SteeringError

log = logging.getLogger(__name__)

__all__ = ["STEERING_MODES", "make_flow_steering"]

STEERING_MODES = ("auto", "bpf", "nft")


_decided: dict[str, tuple[str, str]] = {}   # mode -> (kind, why): decided once per process (workers inherit it)


def make_flow_steering(mode: str, **kwargs: Any) -> Any:
    """The steering object for `mode` (not installed yet: install() it, or use it as a handle on what is
    installed). The choice is made, and logged, once per process."""
    if mode not in _decided:
        _decided[mode] = _decide(mode, kwargs)
        log.log(NOTICE, "flow steering: %s", _decided[mode][1])
    kind = _decided[mode][0]
    return BpfFlowSteering(**kwargs) if kind == "bpf" else FlowSteering(**kwargs)


def _decide(mode: str, kwargs: dict[str, Any]) -> tuple[str, str]:
    if mode not in STEERING_MODES:
        raise SteeringError(f"steering must be one of {', '.join(STEERING_MODES)}, not {mode!r}")
    if mode == "nft":
        return "nft", "nft (steering = nft)"
    why_not = bpf_steering_possible()
    if mode == "bpf":
        if why_not is not None:
            raise SteeringError(f"steering = bpf, but this kernel refuses the steering program: {why_not}")
        return "bpf", "bpf (steering = bpf)"
    if why_not is None:
        if _nft_table_left(kwargs):
            return "nft", "nft (steering = auto: adopting the nft table a predecessor left, with its flows)"
        return "bpf", "bpf (steering = auto: the kernel loads the tc program)"
    return "nft", f"nft (steering = auto: no BPF steering here: {why_not})"


def _nft_table_left(kwargs: dict[str, Any]) -> bool:
    """A predecessor's nft steering table is there (its flows stay with it when auto keeps nft)."""
    nft = FlowSteering(**kwargs)
    try:
        return nft.installed()
    except Exception:                    # no nftables here: nothing to adopt
        return False
    finally:
        nft.close()
