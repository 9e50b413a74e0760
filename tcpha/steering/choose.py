"""The one place the front end's steering implementation is chosen (`steering = auto|bpf|nft`).

- nft: tcpha.steering.flows.FlowSteering (an nftables netdev table);
- bpf: tcpha.steering.bpf.BpfFlowSteering (a tc ingress BPF program and hash map);
- auto: bpf when this kernel loads the steering program (checked once, at start), else nft.

Both have the same interface and survive a front-end kill -9 (the next process adopts the kernel state).
auto keeps nft when a predecessor's nft table is there (it adopts it, flows and all). Switching kinds
explicitly across a restart leaves the other kind's flows to its own kernel object until their
flowtimeout (tc ingress runs before the nft ingress hook; both see the packets).

Routed mode (`tunnel = vxlan|ipip`, tcpha.steering.tunnel) sets tunnel keys, which only the BPF program
does: it needs bpf (auto picks it, nft is refused), and a kernel that makes that kind of tunnel (checked
here, at start: one line when it does not, as for ipip on a kernel without the module).
"""

from __future__ import annotations

import logging
from typing import Any

from tcpha.loglevels import NOTICE

from .bpf import BpfFlowSteering, bpf_steering_possible
from .flows import FlowSteering, SteeringError
from .tunnel import TUNNELS, tunnel_possible

log = logging.getLogger(__name__)

__all__ = ["STEERING_MODES", "make_flow_steering"]

STEERING_MODES = ("auto", "bpf", "nft")


_decided: dict[tuple[str, str], tuple[str, str]] = {}   # (mode, tunnel) -> (kind, why): decided once per process (workers inherit it)


def make_flow_steering(mode: str, **kwargs: Any) -> Any:
    """The steering object for `mode` (not installed yet: install() it, or use it as a handle on what is
    installed). The choice is made, and logged, once per process."""
    tunnel = kwargs.pop("tunnel", "none")
    if tunnel not in TUNNELS:
        raise SteeringError(f"tunnel must be one of {', '.join(TUNNELS)}, not {tunnel!r}")
    decision = (mode, tunnel)
    if decision not in _decided:
        _decided[decision] = _decide(mode, kwargs) if tunnel == "none" else _decide_tunnel(mode, tunnel, kwargs)
        log.log(NOTICE, "flow steering: %s", _decided[decision][1])
    kind = _decided[decision][0]
    if kind == "bpf":
        return BpfFlowSteering(tunnel=tunnel, **kwargs)
    return FlowSteering(**kwargs)


def _decide_tunnel(mode: str, tunnel: str, kwargs: dict[str, Any]) -> tuple[str, str]:
    if mode not in STEERING_MODES:
        raise SteeringError(f"steering must be one of {', '.join(STEERING_MODES)}, not {mode!r}")
    if mode == "nft":
        raise SteeringError(f"tunnel = {tunnel} needs steering = bpf (or auto): nft cannot set tunnel keys")
    why_not = bpf_steering_possible()
    if why_not is not None:
        raise SteeringError(f"tunnel = {tunnel} needs the BPF steering program, which this kernel refuses: {why_not}")
    why_not = tunnel_possible(tunnel, netns=kwargs.get("netns"))
    if why_not is not None:
        raise SteeringError(why_not)
    return "bpf", (f"bpf (steering = {mode}, tunnel = {tunnel}: handed-off flows go to their back ends "
                   "encapsulated)")


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
