"""Effects: work the protocol layer asks the I/O side to do and wait for.

A handler that needs an answer only the I/O side can give yields one of
these (see backend.NetBackend.get_vring_base); dispatch.Dispatcher.steps()
hands it on to the I/O side, which does the work (without blocking its
event loop) and sends the answer back into the handler. Plain data, no I/O.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class StopRing:
    """Stop processing ring `index` now. Answer: its next avail index as
    GET_VRING_BASE reports it (packed: position | wrap << 15), or None when
    nobody was processing it (the device's own base is right)."""
    index: int
