"""The lab: topology descriptions (data) and the namespace builder (mechanism)."""

from .topology import DEFAULT_TOPOLOGY, HostSpec, Topology, TopologyError, load_topology, make_topology
from .netns import LabError, LinkCounters, NamespaceLab, in_netns, remove_prefix

__all__ = ["DEFAULT_TOPOLOGY", "HostSpec", "Topology", "TopologyError", "load_topology", "make_topology",
           "LabError", "LinkCounters", "NamespaceLab", "in_netns", "remove_prefix"]
