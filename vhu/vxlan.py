"""VXLAN (RFC 7348) ports as the user names them, and the wire format.

Plain data and pure functions, no I/O (vhu.vxlanport opens the sockets, the
worker engine's vhu/workers/_vxlan.pxi moves the datagrams): every layer may
import this module.

    --vxlan vni=N,local=IP,remote=IP[,remote=IP...][,port=4789]

A VXLAN port is a tunnel endpoint (VTEP): the inner Ethernet frame behind
an 8-byte VXLAN header, in a UDP datagram to a remote VTEP's port (4789 by
default, the IANA port the Linux kernel's vxlan uses with dstport 4789).
The outer IPv4 and UDP headers are the kernel's: vhu sends through UDP
sockets bound to `local` and builds neither outer Ethernet nor IP itself.

Header (RFC 7348 section 5):

    0                   1                   2                   3
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |R|R|R|R|I|R|R|R|            Reserved                           |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                VXLAN Network Identifier (VNI) |   Reserved    |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

On receive a header is accepted only as the kernel's vxlan accepts it: the
I flag and nothing else in the first word, the port's VNI, a zero last
byte (the kernel drops a frame with flags it did not parse).
"""
import ipaddress
import struct
from dataclasses import dataclass

DEFAULT_PORT = 4789                   # IANA's VXLAN port (the kernel's dstport 4789)
HEADER_LEN = 8
FLAG_I = 0x08                         # "the VNI is valid": the one flag RFC 7348 defines
MAX_VNI = (1 << 24) - 1
# Bytes an inner frame costs on the underlay beyond its own: outer IPv4 (20,
# no options), UDP (8), VXLAN (8). The inner Ethernet header (14) is the
# frame's: a guest IP MTU must be 50 bytes below the underlay's.
OUTER_OVERHEAD = 20 + 8 + HEADER_LEN
GUEST_MTU_OVERHEAD = OUTER_OVERHEAD + 14
MIN_FRAME = 14                        # an inner frame shorter than an Ethernet header is bad
# The engine's bounds (vhu/workers/_vxlan.pxi VX_MAX_REMOTES, VX_MAX_SEND).
MAX_REMOTES = 32
SEND_SOCKETS = 8
# Per-remote counters the engine keeps (u64 each, in this order).
REMOTE_COUNTERS = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "macs", "tx_errors",
                   "rx_bad", "reserved")
# The source ports the kernel's vxlan picks from when none are configured:
# udp_flow_src_port() falls back to inet_get_local_port_range(), whose
# default (net.ipv4.ip_local_port_range) is this.
DEFAULT_SOURCE_PORTS = (32768, 60999)

_HDR = struct.Struct("!II")


class VxlanError(ValueError):
    """A VXLAN spec or header that is not valid; the message says why."""


@dataclass(frozen=True)
class VxlanPort:
    """A VXLAN tunnel endpoint as a port: VNI vni, UDP on local:port, frames
    to and from the remote VTEPs (IPv4 addresses, a static list). One queue,
    meeting queue pair 0 of the other ports (as a TAP)."""
    vni: int
    local: str
    remotes: tuple
    port: int = DEFAULT_PORT

    def __init__(self, vni, local, remotes, port=DEFAULT_PORT):
        if isinstance(remotes, (str, bytes)):
            remotes = (remotes,)
        object.__setattr__(self, "vni", _vni(vni))
        object.__setattr__(self, "local", _ipv4("local", local))
        rs = tuple(_ipv4("remote", r) for r in remotes)
        if not rs:
            raise VxlanError("a VXLAN port needs at least one remote")
        if len(rs) > MAX_REMOTES:
            raise VxlanError(f"at most {MAX_REMOTES} remotes")
        if len(set(rs)) != len(rs):
            raise VxlanError("the same remote twice")
        if self.local in rs:
            raise VxlanError(f"remote {self.local} is the local address")
        object.__setattr__(self, "remotes", rs)
        object.__setattr__(self, "port", _udp_port(port))

    @property
    def name(self):
        """How the stats and vhu.ctl name it: vxlan:VNI@LOCAL:PORT."""
        return f"vxlan:{self.vni}@{self.local}:{self.port}"

    def spec(self):
        """The --vxlan text that makes this port."""
        return ",".join([f"vni={self.vni}", f"local={self.local}"] +
                        [f"remote={r}" for r in self.remotes] + [f"port={self.port}"])


def _vni(v):
    try:
        v = int(v)
    except (TypeError, ValueError):
        raise VxlanError(f"vni {v!r} is not a number") from None
    if not 0 <= v <= MAX_VNI:
        raise VxlanError(f"vni {v} is outside 0..{MAX_VNI} (24 bits)")
    return v


def _udp_port(p):
    try:
        p = int(p)
    except (TypeError, ValueError):
        raise VxlanError(f"port {p!r} is not a number") from None
    if not 1 <= p <= 65535:
        raise VxlanError(f"port {p} is outside 1..65535")
    return p


def _ipv4(what, text):
    try:
        a = ipaddress.IPv4Address(str(text))
    except ValueError:
        raise VxlanError(f"{what} {text!r} is not an IPv4 address") from None
    if a.is_multicast or a.is_unspecified or a == ipaddress.IPv4Address("255.255.255.255"):
        # No multicast groups (yet): remotes are unicast VTEPs, local an address to bind.
        raise VxlanError(f"{what} {a} is not a unicast address")
    return str(a)


def parse_spec(text):
    """'vni=42,local=10.0.0.1,remote=10.0.0.2[,remote=...][,port=4789]' -> VxlanPort."""
    fields = {"vni": [], "local": [], "remote": [], "port": []}
    for part in str(text).split(","):
        key, eq, value = part.strip().partition("=")
        if not eq or not value.strip():
            raise VxlanError(f"{part.strip()!r} is not key=value")
        key = key.strip()
        if key not in fields:
            raise VxlanError(f"unknown key {key!r} (have vni, local, remote, port)")
        fields[key].append(value.strip())
    for key in ("vni", "local", "port"):
        if len(fields[key]) > 1:
            raise VxlanError(f"{key} given twice")
    for key in ("vni", "local", "remote"):
        if not fields[key]:
            raise VxlanError(f"{key}= is missing")
    return VxlanPort(vni=fields["vni"][0], local=fields["local"][0], remotes=fields["remote"],
                     port=fields["port"][0] if fields["port"] else DEFAULT_PORT)


def header(vni):
    """The 8-byte header vhu puts before every inner frame it sends."""
    return _HDR.pack(FLAG_I << 24, _vni(vni) << 8)


def parse_header(data, vni=None):
    """The VNI of a datagram's header, as the engine decides (raises
    VxlanError for what it drops and counts as vxlan_bad): at least a header
    and an Ethernet header, the I flag alone, a zero last byte, and the
    expected vni if one is given."""
    if len(data) < HEADER_LEN + MIN_FRAME:
        raise VxlanError(f"{len(data)} bytes: shorter than a VXLAN and an Ethernet header")
    flags, word = _HDR.unpack_from(data)
    if flags != FLAG_I << 24:
        raise VxlanError(f"flags word {flags:#010x}, not {FLAG_I << 24:#010x}")
    if word & 0xFF:
        raise VxlanError(f"reserved byte {word & 0xFF:#04x} is not zero")
    if vni is not None and word >> 8 != vni:
        raise VxlanError(f"vni {word >> 8}, not {vni}")
    return word >> 8


def max_inner_frame(underlay_mtu):
    """The largest inner Ethernet frame (no FCS) a datagram carries within
    underlay_mtu without IP fragmentation (vhu never fragments)."""
    n = int(underlay_mtu) - OUTER_OVERHEAD
    if n < MIN_FRAME:
        raise VxlanError(f"underlay MTU {underlay_mtu} leaves no room for a frame")
    return min(n, 65535)


def source_port(flow_hash, lo=DEFAULT_SOURCE_PORTS[0], hi=DEFAULT_SOURCE_PORTS[1]):
    """The kernel's udp_flow_src_port() mapping of a 32-bit flow hash into
    [lo, hi): what a kernel VTEP would pick for the same hash."""
    return (((flow_hash & 0xFFFFFFFF) * (hi - lo)) >> 32) + lo


def local_port_range(path="/proc/sys/net/ipv4/ip_local_port_range"):
    """net.ipv4.ip_local_port_range: where the send sockets' (ephemeral)
    source ports come from, as the kernel's vxlan's do by default."""
    try:
        with open(path) as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return DEFAULT_SOURCE_PORTS
