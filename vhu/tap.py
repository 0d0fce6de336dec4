"""TAP ports: a Linux TAP device as a vhu port, so a VM reaches the host's
kernel network stack (--tap NAME, or vhu.workers.TapDevice in a Forwarder).

The master creates the device (TUNSETIFF, IFF_TAP | IFF_NO_PI: plain
Ethernet frames, one per read/write) and hands a duplicate of its fd to the
worker owning queue pair 0, whose compiled loop reads it (O_NONBLOCK) and
writes frames for it; the tap's epoll readiness wakes a sleeping worker like
a kick. A TAP has one queue: its frames meet queue pair 0 of the other
ports. The device exists while vhu runs (it is not persistent); bring it up
and address it (or move it into a network namespace) as for any interface.
"""
import fcntl
import logging
import os
import struct

log = logging.getLogger("vhu.tap")

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16


def open_tap(name):
    """A new (or existing, not persistent-attached) TAP device: its fd."""
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or name.strip() != name:
        raise ValueError(f"bad interface name {name!r}")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError as exc:
        os.close(fd)
        raise OSError(exc.errno, f"TAP {name}: {exc.strerror}") from None
    return fd


class TapPort:
    """The master's side of a TAP port (the control loop's port interface,
    as vhu.ports.Port)."""

    def __init__(self, control, index, name):
        self.control = control
        self.index = index
        self.name = name
        self.path = f"tap:{name}"
        self.fd = None
        self.queue_pairs_in_use = 1       # one queue, served by queue pair 0's worker
        self.spec = None                  # what it was made from (vhu.portspecs)

    @property
    def connected(self):
        return self.fd is not None

    def _worker(self):
        return self.control.config.worker_of(0)

    def open(self):
        self.fd = open_tap(self.name)
        log.info("port %d: TAP %s", self.index, self.name)

    def serve(self):
        self.control.pool.submit(self._worker(), "tap", self.index, fds=[os.dup(self.fd)],
                                 port=self)

    def replay(self, worker):
        if self.fd is None or worker != self._worker():
            return []
        return [("tap", (self.index,), [os.dup(self.fd)], self)]

    def memory_fault(self, sig, addr):          # a TAP has no guest memory
        pass

    def command_failed(self, name, message):
        # The port stays down; the others go on.
        log.error("port %d: TAP %s: worker refused %s: %s", self.index, self.name, name, message)
        self._drop()

    def _drop(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self):
        if self.fd is not None and self.control.pool is not None:
            self.control.pool.submit(self._worker(), "tap_close", self.index, port=None)
        self._drop()
