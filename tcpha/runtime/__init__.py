"""Running daemons' control surface: the /proc-style control directory, the control socket, and the
control plane thread that serves both (tcpha.runtime.plane)."""

from tcpha.runtime.tree import ControlFile, ControlTree, WriteRefused

__all__ = ["ControlFile", "ControlTree", "WriteRefused"]
