"""The FE<->BE control channel: authenticated, replay-protected messages (sans-I/O).

See tcpha/control/protocol.py for the frame format and the rules it enforces, and
tcpha/control/messages.py for the messages.
"""

from tcpha.control.messages import (MESSAGE_TYPES, FlowClosed, Handoff, Hello, PayloadError, Ping, Pong,
                                    Refused, Register, Registered, Restored, Steered,
                                    Rules, MoveAsk, MoveFrozen, MoveRefused, Moved,
                                    Unregister)
from tcpha.control.protocol import (DEFAULT_MAX_MESSAGE, HELLO_MAX, ControlConnection, ControlError)

__all__ = ["ControlConnection", "ControlError", "PayloadError", "Hello", "Handoff", "Restored",
           "Refused", "FlowClosed", "Ping", "Pong", "Register", "Registered", "Unregister", "Steered",
           "Rules", "MoveAsk", "MoveFrozen", "MoveRefused", "Moved",
           "MESSAGE_TYPES", "DEFAULT_MAX_MESSAGE", "HELLO_MAX"]
