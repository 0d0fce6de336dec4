"""What a port is, as a user names it: the specs the CLI, the Forwarder and
the control socket create ports from (vhu.control builds the port itself).

Plain data, no I/O: every layer may import it.
"""
import os
from typing import Optional

from vhu.vxlan import VxlanPort  # noqa: F401  (a port spec like the two below; plain data)


class VhostUserPort:
    """A vhost-user socket: vhu listens on path (server, default) or connects
    to a front-end listening there (client=True: QEMU server=on, virtio-user
    server=1). queues: the most queue pairs it offers (default: the
    master's --queues, which also bounds it)."""

    def __init__(self, path, client=False, queues: Optional[int] = None):
        self.path = os.fspath(path)
        self.client = bool(client)
        self.queues = None if queues is None else int(queues)

    def __repr__(self):
        q = "" if self.queues is None else f", queues={self.queues}"
        return f"VhostUserPort({self.path!r}, client={self.client}{q})"

    def __eq__(self, other):
        return isinstance(other, VhostUserPort) and (self.path, self.client, self.queues) == \
            (other.path, other.client, other.queues)

    def __hash__(self):
        return hash((self.path, self.client, self.queues))


class TapDevice:
    """A Linux TAP device as a port (created by vhu, IFF_TAP | IFF_NO_PI; one
    queue, meeting queue pair 0 of the other ports)."""

    def __init__(self, name):
        self.name = str(name)

    def __repr__(self):
        return f"TapDevice({self.name!r})"

    def __eq__(self, other):
        return isinstance(other, TapDevice) and self.name == other.name

    def __hash__(self):
        return hash(self.name)
