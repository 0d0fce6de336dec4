"""TAP ports: a Linux TAP device as a vhu port, so a VM reaches the host's
kernel network stack (--tap NAME, or vhu.workers.TapDevice in a Forwarder).

The master creates the device (TUNSETIFF, IFF_TAP | IFF_NO_PI and, unless
--offloads off, IFF_VNET_HDR: see open_tap) and hands a duplicate of its fd to the
worker it is placed on (vhu.placement), whose compiled loop reads it
(O_NONBLOCK) and writes frames for it (with frames crossing ports, every
other worker writes into it too); the tap's epoll readiness wakes a sleeping worker like
a kick. A TAP has one queue: its frames meet queue pair 0 of the other
ports. The device exists while vhu runs (it is not persistent); bring it up
and address it (or move it into a network namespace) as for any interface.
"""
import fcntl
import logging
import os
import struct

from vhu.protocol.backend import OFFLOAD_FEATURES, negotiated_offloads

log = logging.getLogger("vhu.tap")

TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
IFNAMSIZ = 16
# With IFF_VNET_HDR every frame read or written starts with this many bytes
# of virtio_net_hdr (12: the VERSION_1 layout, num_buffers unused).
VNET_HDR_LEN = 12
# The offloads a TAP with IFF_VNET_HDR does both ways, as virtio-net
# features: the kernel takes any checksum or TSO request from vhu, and
# TUNSETOFFLOAD lets it hand vhu large and partial-checksum frames, which
# vhu segments or finishes for any port that cannot take them.
TAP_FEATURES = OFFLOAD_FEATURES


def open_tap(name, vnet_hdr=False):
    """A new (or existing, not persistent-attached) TAP device: its fd.
    vnet_hdr: with IFF_VNET_HDR, TUNSETVNETHDRSZ 12 and TUNSETOFFLOAD
    (checksum, TSO4, TSO6, ECN), so the kernel hands vhu large frames and
    takes them from it; else plain frames."""
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or name.strip() != name:
        raise ValueError(f"bad interface name {name!r}")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
        if vnet_hdr:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
    except OSError as exc:
        os.close(fd)
        raise OSError(exc.errno, f"TAP {name}: {exc.strerror}") from None
    return fd


def vnet_hdr_len(fd):
    """VNET_HDR_LEN if the TAP fd was opened with IFF_VNET_HDR, else 0
    (also for an fd that is not a TAP)."""
    try:
        ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    except OSError:
        return 0
    return VNET_HDR_LEN if struct.unpack_from("H", ifr, 16)[0] & IFF_VNET_HDR else 0


class TapPort:
    """The master's side of a TAP port (the control loop's port interface,
    as vhu.ports.Port)."""

    def __init__(self, control, index, name):
        self.control = control
        self.index = index
        self.name = name
        self.path = f"tap:{name}"
        self.fd = None
        self.queue_pairs_in_use = 1       # one queue, placed like a queue pair (reader())
        self.spec = None                  # what it was made from (vhu.portspecs)
        self.offloads = []                # what it does (stats JSON): all with IFF_VNET_HDR

    @property
    def connected(self):
        return self.fd is not None

    def reader(self):
        """The worker that reads it: its one queue is placed like any port's (vhu.placement)."""
        return self.control.placement.worker(self.index, 0)

    def open(self):
        vnet = self.control.config.offloads
        self.fd = open_tap(self.name, vnet_hdr=vnet)
        self.offloads = negotiated_offloads(TAP_FEATURES) if vnet else []
        log.info("port %d: TAP %s%s", self.index, self.name,
                 " (IFF_VNET_HDR: checksum and TSO offloads)" if vnet else "")

    def _workers(self):
        """Its reader first; with several workers and frames crossing ports
        (switch, patch, stages) every other worker writes frames into it too,
        as into any port's RX ring (vhu.placement): write(2) takes one whole
        frame from anyone."""
        return self.control.placement.writers(self.index, 0)

    def serve(self):
        for w in self._workers():
            self.control.pool.submit(w, "tap", self.index, w != self.reader(),
                                     fds=[os.dup(self.fd)], port=self)

    def replay(self, worker):
        if self.fd is None or worker not in self._workers():
            return []
        return [("tap", (self.index, worker != self.reader()), [os.dup(self.fd)], self)]

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
            for w in self._workers():
                self.control.pool.submit(w, "tap_close", self.index, port=None)
        self._drop()
        self.control.placement.release(self.index)
