"""VXLAN ports, the master's side: the sockets, and the port in the control loop.

The master opens the sockets (so a worker needs no privilege and a
replacement worker gets the very same ones, like a TAP's fd) and hands
duplicates to the worker owning queue pair 0, whose compiled loop
(vhu/workers/_vxlan.pxi) receives with recvmmsg(2) and sends with
sendmmsg(2):

* one UDP socket bound to local:port: every datagram from the remote VTEPs
  arrives here; the ports (one per VNI) on one local address and UDP port
  share it (Endpoint), and the worker reads it once for all of them;
* vhu.vxlan.SEND_SOCKETS UDP sockets bound to local and an ephemeral port
  (net.ipv4.ip_local_port_range, the kernel vxlan's source port range),
  SO_NO_CHECK (UDP checksum zero on IPv4, as the kernel's vxlan sends by
  default) and IP_PMTUDISC_DO (the kernel refuses, never fragments, a
  datagram over the path MTU); they receive nothing (SO_RCVBUF minimal);
* a memfd of per-remote counters the worker writes and the stats read.

The underlay MTU is the smallest route MTU towards the remotes (IP_MTU of a
connected probe socket); an inner frame bigger than it allows (MTU - 36) is
dropped and counted (vxlan_too_big), and the same bound makes a received
datagram oversized (vxlan_bad).
"""
import ipaddress
import logging
import mmap
import os
import socket

import numpy as np

from vhu import vxlan

log = logging.getLogger("vhu.vxlan")

SO_NO_CHECK = 11               # <asm-generic/socket.h>; not in Python's socket module
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
IP_MTU = getattr(socket, "IP_MTU", 14)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
RECV_BUFFER = 8 << 20          # bytes of datagrams the kernel holds for a busy worker
SEND_BUFFER = 4 << 20
COUNTERS_BYTES = vxlan.MAX_REMOTES * len(vxlan.REMOTE_COUNTERS) * 8


def underlay_mtu(spec):
    """The smallest route MTU from spec.local towards its remotes."""
    mtus = []
    for r in spec.remotes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((spec.local, 0))
            s.connect((r, spec.port))
            mtus.append(s.getsockopt(socket.IPPROTO_IP, IP_MTU))
    return min(mtus)


def _buffer(sock, force, plain, size):
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)      # root: past net.core.*mem_max
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


def open_receive_socket(spec):
    """The socket bound to spec.local:spec.port, non-blocking, close-on-exec."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    try:
        rx.bind((spec.local, spec.port))
        _buffer(rx, SO_RCVBUFFORCE, socket.SO_RCVBUF, RECV_BUFFER)
    except OSError as exc:
        rx.close()
        raise OSError(exc.errno, f"VXLAN {spec.local}:{spec.port}: {exc.strerror}") from None
    return rx


def open_send_sockets(spec):
    """vhu.vxlan.SEND_SOCKETS sockets bound to spec.local, ephemeral ports;
    connected to the remote if there is one (the kernel then keeps the route
    and the source address checked once, not per datagram)."""
    made = []
    try:
        sends = []
        for _ in range(vxlan.SEND_SOCKETS):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
            made.append(s)
            s.bind((spec.local, 0))
            s.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
            s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 0)   # the kernel's minimum
            _buffer(s, SO_SNDBUFFORCE, socket.SO_SNDBUF, SEND_BUFFER)
            if len(spec.remotes) == 1:
                s.connect((spec.remotes[0], spec.port))
            sends.append(s)
        return sends
    except OSError as exc:
        for s in made:
            s.close()
        raise OSError(exc.errno, f"VXLAN {spec.local}:{spec.port}: {exc.strerror}") from None


class Endpoint:
    """One local address and UDP port: its receive socket, shared by the
    VXLAN ports (one per VNI) on it. The worker reads it once for all of
    them and hands each datagram to the port of its VNI."""

    def __init__(self, spec):
        self.key = (spec.local, spec.port)
        self.rx = open_receive_socket(spec)
        self.vnis = {}                # vni -> port index

    def close(self):
        self.rx.close()


MAX_SHARED = 16                       # vhu/workers/_vxlan_defs.pxi VX_MAX_SHARED


class VxlanPortState:
    """The master's side of a VXLAN port (the control loop's port
    interface, as vhu.ports.Port and vhu.tap.TapPort)."""

    def __init__(self, control, index, spec):
        self.control = control
        self.index = index
        self.spec = spec
        self.path = spec.name
        self.rx = None
        self.endpoint = None
        self.sends = []
        self.mem_fd = None
        self.counters = None
        self._map = None
        self.mtu = None
        self.max_inner = None
        self.source_ports = []
        self.queue_pairs_in_use = 1          # one queue, placed like a queue pair (reader())

    @property
    def connected(self):
        return self.rx is not None

    def reader(self):
        """The worker that reads it: its one queue is placed like any port's
        (vhu.placement), but the VNIs of one endpoint share its receive
        socket, which one worker reads for all of them: the worker of the
        endpoint's first port."""
        placement = self.control.placement
        if placement.lookup(self.index, 0) is None and self.endpoint is not None:
            for other in self.endpoint.vnis.values():
                w = placement.lookup(other, 0) if other != self.index else None
                if w is not None:
                    return placement.assign(self.index, 0, w)
        return placement.worker(self.index, 0)

    def open(self):
        try:
            self.mtu = underlay_mtu(self.spec)
        except OSError as exc:
            raise OSError(exc.errno, f"VXLAN {self.spec.local} -> {' '.join(self.spec.remotes)}: "
                                     f"{exc.strerror}") from None
        self.max_inner = vxlan.max_inner_frame(self.mtu)
        self._join()
        try:
            self.sends = open_send_sockets(self.spec)
        except OSError:
            self._leave()
            raise
        self.source_ports = [s.getsockname()[1] for s in self.sends]
        self.mem_fd = os.memfd_create(f"vhu-vxlan-{self.index}", os.MFD_CLOEXEC)
        os.ftruncate(self.mem_fd, COUNTERS_BYTES)
        self._map = mmap.mmap(self.mem_fd, COUNTERS_BYTES)
        self.counters = np.frombuffer(self._map, np.uint64).reshape(
            vxlan.MAX_REMOTES, len(vxlan.REMOTE_COUNTERS))
        log.info("port %d: VXLAN vni %d on %s:%d to %s (underlay MTU %d: inner frames up to "
                 "%d bytes, guest MTU %d; source ports %s)", self.index, self.spec.vni,
                 self.spec.local, self.spec.port, " ".join(self.spec.remotes), self.mtu,
                 self.max_inner, self.mtu - vxlan.GUEST_MTU_OVERHEAD,
                 " ".join(map(str, self.source_ports)))

    def _join(self):
        """Take the endpoint's receive socket (opened by the first port on it)."""
        endpoints = self.control.vxlan_endpoints
        ep = endpoints.get((self.spec.local, self.spec.port))
        if ep is None:
            ep = endpoints[(self.spec.local, self.spec.port)] = Endpoint(self.spec)
        elif self.spec.vni in ep.vnis:
            raise ValueError(f"vni {self.spec.vni} on {self.spec.local}:{self.spec.port} is port "
                             f"{ep.vnis[self.spec.vni]} already")
        elif len(ep.vnis) >= MAX_SHARED:
            raise ValueError(f"at most {MAX_SHARED} VNIs on {self.spec.local}:{self.spec.port}")
        ep.vnis[self.spec.vni] = self.index
        self.endpoint, self.rx = ep, ep.rx

    def _leave(self):
        ep, self.endpoint, self.rx = self.endpoint, None, None
        if ep is not None:
            ep.vnis.pop(self.spec.vni, None)
            if not ep.vnis:
                ep.close()
                self.control.vxlan_endpoints.pop(ep.key, None)

    def _workers(self):
        """Its reader first; with several workers and frames crossing ports
        (switch, patch, stages) every other worker sends into it too, as into
        any port's RX ring (vhu.placement). Those learn no remotes (the reader
        does): their unicast frames go to every remote."""
        self.reader()                # placed first: beside the other VNIs of its socket
        return self.control.placement.writers(self.index, 0)

    def _command(self, worker):
        fds = [os.dup(self.rx.fileno())] + [os.dup(s.fileno()) for s in self.sends] + \
              [os.dup(self.mem_fd)]
        return ("vxlan", (self.index, self.spec.vni, list(self.spec.remotes), self.spec.port,
                          self.max_inner, len(self.spec.remotes) == 1,
                          worker != self.reader()), fds)

    def serve(self):
        for w in self._workers():
            name, args, fds = self._command(w)
            self.control.pool.submit(w, name, *args, fds=fds, port=self)

    def replay(self, worker):
        if self.rx is None or worker not in self._workers():
            return []
        name, args, fds = self._command(worker)
        return [(name, args, fds, self)]

    def memory_fault(self, sig, addr):          # a VXLAN port has no guest memory
        pass

    def command_failed(self, name, message):
        log.error("port %d: %s: worker refused %s: %s", self.index, self.path, name, message)
        self._drop()

    def remote_stats(self):
        """Per remote VTEP: address and vhu.vxlan.REMOTE_COUNTERS (rx: from it)."""
        if self.counters is None:
            return []
        rows = self.counters[:len(self.spec.remotes)].copy()
        out = []
        for addr, row in zip(self.spec.remotes, rows):
            d = {k: int(v) for k, v in zip(vxlan.REMOTE_COUNTERS, row) if k != "reserved"}
            out.append({"remote": addr, **d})
        return out

    def describe(self):
        return {"vni": self.spec.vni, "local": self.spec.local, "udp_port": self.spec.port,
                "remotes": list(self.spec.remotes), "underlay_mtu": self.mtu,
                "max_inner_frame": self.max_inner, "source_ports": self.source_ports}

    def _drop(self):
        self._leave()
        for s in self.sends:
            s.close()
        self.sends = []

    def close(self):
        if self.rx is not None and self.control.pool is not None:
            for w in self._workers():
                self.control.pool.submit(w, "vxlan_close", self.index, port=None)
        self._drop()
        self.control.placement.release(self.index)
        self.counters = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:        # a stats snapshot still holds a view: freed with it
                pass
            self._map = None
        if self.mem_fd is not None:
            os.close(self.mem_fd)
            self.mem_fd = None


def same_endpoint(a, b):
    """Two specs that would bind the same local address and UDP port."""
    return a.port == b.port and ipaddress.IPv4Address(a.local) == ipaddress.IPv4Address(b.local)


def same_port(a, b):
    """Two specs for the same VNI on the same local address and UDP port."""
    return a.vni == b.vni and same_endpoint(a, b)
