"""tcpha: a content-aware TCP-handoff load balancer with a distcache-compatible session cache."""

__version__ = "0.1.0"
