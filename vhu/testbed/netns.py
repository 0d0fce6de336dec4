"""Network namespaces as test and benchmark peers: namespaces, veth pairs,
the Linux kernel's own vxlan devices, and run-in-namespace helpers.

Everything made here is named with a caller's prefix and removed by
Netns.delete() / Lab.close() (which tolerate half-built state), so a
failing test leaves nothing behind. Needs root and iproute2.
"""
import ctypes
import fcntl
import socket
import struct
import subprocess
import sys

SIOCETHTOOL = 0x8946
ETHTOOL_STXCSUM = 0x17          # set TX checksum offload (ethtool -K DEV tx on|off)


def ip(*args, check=True, timeout=30):
    return subprocess.run(["ip", *map(str, args)], capture_output=True, text=True,
                          check=check, timeout=timeout)


def tx_checksum_off(ifname):
    """ethtool -K IFNAME tx off, in the calling process's namespace (no
    ethtool binary needed): the stack then computes checksums itself. The
    kernel's vxlan over veth otherwise hands the inner TCP checksum on as
    "partial" (to be finished by hardware that a UDP socket reader is not),
    and the far end sees bad TCP checksums."""
    value = ctypes.create_string_buffer(struct.pack("II", ETHTOOL_STXCSUM, 0))
    ifr = struct.pack("16sP", ifname.encode(), ctypes.addressof(value)).ljust(40, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifr)


class Netns:
    """One network namespace (created now, loopback up, IPv6 off so that no
    router solicitations or DAD frames add to what the tests count)."""

    def __init__(self, name):
        if len(name) > 15:
            raise ValueError(f"namespace name {name!r}: keep it short (interface names too)")
        self.name = name
        ip("netns", "del", name, check=False)
        ip("netns", "add", name)
        try:
            self.sysctl("net.ipv6.conf.all.disable_ipv6", 1)
            self.sysctl("net.ipv6.conf.default.disable_ipv6", 1)
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise

    def argv(self, *cmd):
        return ["ip", "netns", "exec", self.name, *map(str, cmd)]

    def run(self, *cmd, check=True, timeout=60, input=None):
        return subprocess.run(self.argv(*cmd), capture_output=True, text=True, check=check,
                              timeout=timeout, input=input)

    def popen(self, *cmd, **kw):
        return subprocess.Popen(self.argv(*cmd), **kw)

    def python(self, code, *args, check=True, timeout=60):
        """Run Python code in the namespace (this interpreter)."""
        return self.run(sys.executable, "-c", code, *args, check=check, timeout=timeout)

    def ip(self, *args, check=True):
        return ip("-n", self.name, *args, check=check)

    def sysctl(self, key, value):
        self.run("sysctl", "-qw", f"{key}={value}", check=False)

    def counter(self, ifname, name):
        """/sys/class/net/IFNAME/statistics/NAME in the namespace."""
        out = self.run("cat", f"/sys/class/net/{ifname}/statistics/{name}")
        return int(out.stdout)

    def tx_checksum_off(self, ifname):
        self.python("import sys; from vhu.testbed.netns import tx_checksum_off; "
                    "tx_checksum_off(sys.argv[1])", ifname)

    def delete(self):
        ip("netns", "del", self.name, check=False)


def veth(a, a_if, b, b_if, a_addr, b_addr, mtu=1500):
    """A veth pair a_if (in namespace a, a_addr/24) <-> b_if (in b, b_addr/24)."""
    ip("link", "add", a_if, "mtu", mtu, "netns", a.name, "type", "veth", "peer", "name", b_if,
       "mtu", mtu, "netns", b.name)
    for ns, ifname, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
        ns.ip("addr", "add", f"{addr}/24", "dev", ifname)
        ns.ip("link", "set", ifname, "up")


def kernel_vxlan(ns, name, vni, local, remotes, dev, addr, port=4789, mac=None):
    """The kernel's vxlan device in ns (MTU from dev, 50 bytes less), with
    one all-zeros FDB entry per remote (head-end replication: the kernel's
    own static remote list), addressed addr/24, up, TX checksum offload off."""
    first, rest = remotes[0], remotes[1:]
    ns.ip("link", "add", name, *(("address", mac) if mac else ()), "type", "vxlan", "id", vni,
          "local", local, "remote", first, "dstport", port, "dev", dev)
    for r in rest:
        ns.run("bridge", "fdb", "append", "00:00:00:00:00:00", "dev", name, "dst", r)
    ns.tx_checksum_off(name)
    ns.ip("addr", "add", f"{addr}/24", "dev", name)
    ns.ip("link", "set", name, "up")


# A TCP transfer between namespaces with md5 on both sides: the listener
# writes what it got and its md5; the sender sends a file.
RECEIVER = r"""
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(float(sys.argv[3]))
print("listening", flush=True)
c, _ = s.accept(); c.settimeout(float(sys.argv[3]))
h, n = hashlib.md5(), 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b); n += len(b)
print(n, h.hexdigest(), flush=True)
"""

SENDER = r"""
import hashlib, os, socket, sys
data = os.urandom(int(sys.argv[3]))
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[4]))
s.sendall(data); s.shutdown(socket.SHUT_WR)
s.settimeout(float(sys.argv[4]))
while s.recv(65536):
    pass
print(len(data), hashlib.md5(data).hexdigest(), flush=True)
"""
