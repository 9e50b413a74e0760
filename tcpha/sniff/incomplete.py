"""The "feed me more bytes" answer shared by the sans-I/O sniffers.

``NeedMore`` is a sentinel in the style of h11's ``NEED_DATA``: a class that is an instance of itself, so a caller
may write either ``result is NeedMore`` or ``isinstance(result, NeedMore)`` and both are true; it can never be
confused with a parsed value.
"""

from __future__ import annotations


class _SentinelType(type):
    """Metaclass making each class created with it an instance of itself."""

    def __new__(mcs, name: str, bases: tuple[type, ...], namespace: dict):
        cls = super().__new__(mcs, name, bases, namespace)
        cls.__class__ = cls  # type: ignore[assignment]  # the class is its own type: isinstance(X, X) is True
        return cls

    def __repr__(cls) -> str:
        return cls.__name__


class NeedMore(_SentinelType, metaclass=_SentinelType):
    """Returned by a parser when the bytes seen so far are a valid but incomplete prefix: peek again later."""
