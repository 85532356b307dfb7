"""Errors of the store tier. Each one means "this block is not usable from L3": the caller
recomputes (or keeps the block on the host) and never uses partial bytes."""
from __future__ import annotations


class L3Error(RuntimeError):
    """Base class: the store could not serve or take a block."""


class L3Unavailable(L3Error):
    """The store cannot be reached (master down, client not set up, a previous call stuck)."""


class L3Timeout(L3Error):
    """A store call did not finish within its deadline."""


class L3Full(L3Error):
    """The store refused an object for lack of space."""


class L3Missing(L3Error):
    """A block the lookup found is gone when read (the store evicted it meanwhile)."""


class L3Corrupt(L3Error):
    """An object read back failed its checksum, its header, or does not belong to the key."""
