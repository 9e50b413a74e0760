"""Kernel state for the handoff: flow steering (nftables or tc BPF), the VIP, ARP filtering, neighbour lookup.

No policy here: the daemons decide, these classes only install, adopt and remove kernel objects.
"""

from .address import ADDRESS_PROTO, AddressError, VipAddress, interface_holding
from .arp import ArpFilter, ArpFilterError
from .bpf import BpfFlowSteering
from .choose import STEERING_MODES, make_flow_steering
from .flows import FlowKey, FlowSteering, SteeringError
from .neighbour import NeighbourError, neighbour_mac

__all__ = [
    "ADDRESS_PROTO", "AddressError", "VipAddress", "interface_holding",
    "ArpFilter", "ArpFilterError",
    "FlowKey", "FlowSteering", "SteeringError", "BpfFlowSteering", "STEERING_MODES", "make_flow_steering",
    "NeighbourError", "neighbour_mac",
]
