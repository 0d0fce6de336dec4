"""vhu's own vhost-user front-end: the driver side, as QEMU or DPDK virtio-user.

It connects to a back-end's socket (or listens, for back-ends in client
mode), negotiates features, shares one memfd (SET_MEM_TABLE), sets up split
or packed rings, kicks and gets calls through eventfds, and tears down with
GET_VRING_BASE. Frames move in a compiled loop (``_traffic.pyx``, nogil).

    from vhu.frontend import Frontend
    with Frontend("/tmp/vhost.sock", queues=2) as fe:
        result = fe.run("loop", duration=3)
    print(result.summary())

CLI: ``python -m vhu.frontend --socket PATH [--listen] [--mode tx|rx|loop] ...``

Modules: ``client`` (the requests, on vhu.protocol's wire format and message
table), ``device`` (set-up, memory layout, runs), ``_traffic`` (data path).
"""
from ._traffic import MODES, POLL_MODES
from .client import FrontendError
from .device import DEFAULT_FEATURES, LEGACY_FEATURES, Frontend, Result

__all__ = ["Frontend", "FrontendError", "Result", "MODES", "POLL_MODES", "DEFAULT_FEATURES",
           "LEGACY_FEATURES"]
