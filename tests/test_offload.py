"""The software offload fallback (vhu.workers._offload) against a reference:
random TCP/IPv4, TCP/IPv6 and UDP frames with random MSS, options and flags
are segmented or have their checksum finished by the compiled code, and
dpkt parses every result, its checksums verify (dpkt.in_cksum over the
header, and over the pseudo-header and segment), the payloads concatenate
to the original, and the fields Linux's GSO sets are as it sets them. Then
every way a header can lie is refused with its reason."""
import random
import struct

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from vhu.workers import _offload as off

NEEDS_CSUM = off.NEEDS_CSUM
TCPV4, TCPV6, UDP, ECN = off.GSO["tcpv4"], off.GSO["tcpv6"], off.GSO["udp"], off.GSO["ecn"]
MAC_A, MAC_B = bytes.fromhex("525400000001"), bytes.fromhex("525400000002")
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 1, 2, 4, 8, 16, 32, 64, 128


def fold(s):
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ones_sum(data):
    if len(data) % 2:
        data += b"\0"
    return fold(sum(struct.unpack(f"!{len(data) // 2}H", data)))


def pseudo(src, dst, proto, length, v6):
    if v6:
        return src + dst + struct.pack("!I3xB", length, proto)
    return src + dst + struct.pack("!xBH", proto, length)


def build(v6, proto, payload, *, ip_opts=b"", tcp_opts=b"", flags=ACK, seq=1, ip_id=7, vlan=False,
          tos=0):
    """An Ethernet frame with a partial checksum in place, as Linux sends it
    with NEEDS_CSUM: the L4 checksum field holds the folded pseudo-header sum.
    Returns (frame, csum_start, csum_offset)."""
    ether = MAC_B + MAC_A + ((b"\x81\x00\x00\x05") if vlan else b"") + \
        (b"\x86\xdd" if v6 else b"\x08\x00")
    if proto == 6:
        doff = (20 + len(tcp_opts)) // 4
        l4 = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 99, doff << 4, flags, 65000, 0, 0) \
            + tcp_opts
        check_at = 16
    else:
        l4 = struct.pack("!HHHH", 40000, 5201, 8 + len(payload), 0)
        check_at = 6
    seg = l4 + payload
    if v6:
        src, dst = bytes(range(16)), bytes(range(16, 32))
        ip = struct.pack("!IHBB", 0x60000000 | tos << 20, len(seg), proto, 64) + src + dst
    else:
        src, dst = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
        ihl = (20 + len(ip_opts)) // 4
        ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, ihl * 4 + len(seg), ip_id, 0x4000, 64,
                         proto, 0, src, dst) + ip_opts
        ip = ip[:10] + struct.pack("!H", ~ones_sum(ip) & 0xFFFF) + ip[12:]
    part = ones_sum(pseudo(src, dst, proto, len(seg), v6))
    seg = seg[:check_at] + struct.pack("!H", part) + seg[check_at + 2:]
    start = len(ether) + len(ip)
    return ether + ip + seg, start, check_at


def parse(frame):
    e = dpkt.ethernet.Ethernet(frame)
    ip = e.data
    assert isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)), e
    return e, ip, ip.data


def l3_offset(frame):
    return 18 if frame[12:14] == b"\x81\x00" else 14


def assert_l4_checksum(frame, v6, proto):
    l3 = l3_offset(frame)
    if v6:
        src, dst, l4 = frame[l3 + 8:l3 + 24], frame[l3 + 24:l3 + 40], l3 + 40
    else:
        ihl = (frame[l3] & 15) * 4
        assert dpkt.in_cksum(frame[l3:l3 + ihl]) == 0, "IPv4 header checksum"
        src, dst, l4 = frame[l3 + 12:l3 + 16], frame[l3 + 16:l3 + 20], l3 + ihl
    seg = frame[l4:]
    assert dpkt.in_cksum(pseudo(src, dst, proto, len(seg), v6) + seg) == 0, "L4 checksum"


opts4 = st.integers(0, 10).map(lambda n: bytes([1] * (4 * n)))        # NOPs
tcp_opts = st.integers(0, 10).map(lambda n: b"\x01\x01\x08\x0a" + bytes(8) if n % 2 else
                                  bytes([1] * (4 * n)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(v6=st.booleans(), size=st.integers(1, 64000), mss=st.integers(off.MIN_MSS, 9000),
       ip_opts=opts4, topts=tcp_opts, flags=st.integers(0, 255).map(lambda f: (f & ~(SYN | RST)) | ACK),
       seq=st.integers(0, 2**32 - 1), ip_id=st.integers(0, 65535), vlan=st.booleans(),
       ecn=st.booleans(), seed=st.integers(0, 2**32))
def test_tso_segments_parse_verify_and_concatenate(v6, size, mss, ip_opts, topts, flags, seq,
                                                  ip_id, vlan, ecn, seed):
    payload = random.Random(seed).randbytes(size)
    frame, start, coff = build(v6, 6, payload, ip_opts=b"" if v6 else ip_opts, tcp_opts=topts,
                               flags=flags, seq=seq, ip_id=ip_id, vlan=vlan)
    if len(frame) > 65535:
        frame = frame[:65535]
        payload = frame[start + 20 + len(topts):]
    gso = (TCPV6 if v6 else TCPV4) | (ECN if ecn else 0)
    segs = off.segment(frame, gso, mss, start, coff)
    assert len(segs) == -(-len(payload) // mss)
    got = b""
    hlen = start + 20 + len(topts)
    for k, s in enumerate(segs):
        last = k == len(segs) - 1
        e, ip, tcp = parse(s)
        assert s[:hlen - 20 - len(topts)][:12] == frame[:12]               # addresses kept
        assert len(s) == hlen + min(mss, len(payload) - k * mss)
        assert tcp.seq == (seq + k * mss) % 2**32
        assert tcp.ack == 99 and tcp.win == 65000 and tcp.opts == topts
        want = flags
        if not last:
            want &= ~(FIN | PSH)
        if k:
            want &= ~CWR
        assert tcp.flags == want, (k, tcp.flags, want)
        if v6:
            assert ip.plen == len(s) - l3_offset(s) - 40
        else:
            assert ip.len == len(s) - l3_offset(s)
            assert ip.id == (ip_id + k) % 65536
            assert ip.off == 0x4000 and ip.opts == ip_opts
        assert_l4_checksum(s, v6, 6)
        got += tcp.data
    assert got == payload


@settings(max_examples=150, deadline=None)
@given(v6=st.booleans(), proto=st.sampled_from([6, 17]), size=st.integers(0, 9000),
       topts=tcp_opts, vlan=st.booleans(), seed=st.integers(0, 2**32))
def test_checksum_completion_verifies(v6, proto, size, topts, vlan, seed):
    payload = random.Random(seed).randbytes(size)
    frame, start, coff = build(v6, proto, payload, tcp_opts=topts, vlan=vlan)
    done = off.fill_checksum(frame, start, coff)
    assert len(done) == len(frame)
    # Only the checksum field changed, and now it verifies.
    at = start + coff
    assert done[:at] == frame[:at] and done[at + 2:] == frame[at + 2:]
    assert_l4_checksum(done, v6, proto)
    e, ip, l4 = parse(done)
    assert l4.data == (payload if proto == 17 else payload)
    if proto == 17:
        assert done[at:at + 2] != b"\0\0"          # 0 is "no checksum" to UDP: sent as 0xFFFF


def test_checksum_completion_anywhere_in_the_frame():
    """csum_start/offset need not be a known protocol's: the sum from start
    to the end (the field's partial value included), stored at start +
    offset (what the driver asked for). An odd start too; the offset is
    even, as every checksum field's is (an odd one is stored where asked,
    but no sum can come out right then)."""
    data = bytearray(bytes(range(256)) * 3)
    for start, offset, seed in ((101, 6, 0), (100, 16, 0x1234), (34, 6, 0xFFFF), (3, 700, 0x8000)):
        data[start + offset:start + offset + 2] = seed.to_bytes(2, "big")
        done = off.fill_checksum(bytes(data), start, offset)
        at = start + offset
        assert done[:at] == data[:at] and done[at + 2:] == data[at + 2:]
        # What a receiver checks: the region's sum, plus the partial seed
        # the sender left for it (the pseudo-header's), is all ones.
        assert fold(ones_sum(done[start:] if (len(done) - start) % 2 == 0 else
                             done[start:] + b"\0") + seed) == 0xFFFF


def tso4(payload=b"x" * 3000, **kw):
    return build(False, 6, payload, **kw)


@pytest.mark.parametrize("case, reason", [
    (dict(flags=NEEDS_CSUM, caps=0), "not_negotiated"),                           # no CSUM
    (dict(gso_type=TCPV4, caps=off.CAPS["tx_csum"]), "not_negotiated"),           # no HOST_TSO4
    (dict(gso_type=TCPV4 | ECN, caps=off.CAPS_ALL & ~off.CAPS["tx_ecn"]), "not_negotiated"),
    (dict(gso_type=UDP), "not_negotiated"),                                       # no UFO offered
    (dict(gso_type=2), "gso_type"),
    (dict(gso_type=TCPV4, flags=0), "gso_without_csum"),
    (dict(gso_type=TCPV4, gso_size=0), "gso_size"),
    (dict(gso_type=TCPV4, gso_size=off.MIN_MSS - 1), "gso_size"),
    (dict(gso_type=TCPV6), "not_tcp_ip"),                                         # an IPv4 frame
    (dict(gso_type=TCPV4, csum_offset=6), "csum_not_tcp"),
    (dict(gso_type=TCPV4, csum_start=14), "csum_not_tcp"),
    (dict(csum_start=3053, csum_offset=0), "csum_range"),                         # past the end
    (dict(csum_start=3000, csum_offset=60), "csum_range"),
])
def test_lying_headers_are_refused(case, reason):
    frame, start, coff = tso4()
    kw = dict(flags=NEEDS_CSUM, gso_type=0, gso_size=1448, csum_start=start, csum_offset=coff,
              caps=off.CAPS_ALL)
    kw.update(case)
    assert off.check(frame, **kw) == reason


def test_tso_frame_that_is_not_tcp_ip_is_refused():
    frame, start, coff = tso4()
    kw = dict(flags=NEEDS_CSUM, gso_type=TCPV4, gso_size=1448, csum_start=start, csum_offset=coff)
    assert off.check(frame, **kw) == "ok"
    udp, s, c = build(False, 17, b"x" * 3000)
    assert off.check(udp, **dict(kw, csum_start=s, csum_offset=16)) == "not_tcp_ip"
    frag = bytearray(frame)
    frag[14 + 6] |= 0x20                                                  # MF: a fragment
    assert off.check(bytes(frag), **kw) == "not_tcp_ip"
    arp = frame[:12] + b"\x08\x06" + frame[14:]
    assert off.check(arp, **kw) == "not_tcp_ip"
    short_doff = bytearray(frame)
    short_doff[start + 12] = 0x40                                          # TCP header of 16 bytes
    assert off.check(bytes(short_doff), **kw) == "not_tcp_ip"
    assert off.check(frame[:start + 20], **kw) == "no_payload"
    assert off.check(frame[:start + 10], **kw) == "not_tcp_ip"            # TCP header cut
    assert off.check(frame[:30], **kw) == "not_tcp_ip"
    assert off.check(b"", **kw) == "not_tcp_ip"
    six, s6, c6 = build(True, 6, b"y" * 3000)
    ext = bytearray(six)
    ext[14 + 6] = 0                                                       # hop-by-hop first
    assert off.check(bytes(ext), **dict(kw, gso_type=TCPV6, csum_start=s6)) == "not_tcp_ip"
    assert off.check(six, **dict(kw, gso_type=TCPV6, csum_start=s6)) == "ok"


def test_header_passed_on_says_only_what_was_checked():
    frame, start, coff = tso4()
    # DATA_VALID (2) from a guest is never passed on; hdr_len is the real one.
    h = off.header_out(frame, flags=NEEDS_CSUM | 2, gso_type=TCPV4, gso_size=1448,
                       csum_start=start, csum_offset=coff)
    assert h == struct.pack("<BBHHHH", NEEDS_CSUM, TCPV4, start + 20, 1448, start, coff)
    h = off.header_out(frame, flags=NEEDS_CSUM, csum_start=start, csum_offset=coff)
    assert h == struct.pack("<BBHHHH", NEEDS_CSUM, 0, 0, 0, start, coff)


def test_capabilities_need_their_prerequisites():
    CSUM, GUEST_CSUM, GUEST_TSO4, GUEST_ECN, HOST_TSO4, HOST_TSO6, HOST_ECN = (
        1 << 0, 1 << 1, 1 << 7, 1 << 9, 1 << 11, 1 << 12, 1 << 13)
    assert off.capabilities(0) == set()
    assert off.capabilities(HOST_TSO4 | HOST_ECN) == set()               # no CSUM: nothing
    assert off.capabilities(CSUM | HOST_TSO4 | HOST_TSO6 | HOST_ECN) == {
        "tx_csum", "tx_tso4", "tx_tso6", "tx_ecn"}
    assert off.capabilities(CSUM | HOST_ECN) == {"tx_csum"}              # ECN needs a TSO
    assert off.capabilities(GUEST_TSO4 | GUEST_ECN) == set()
    assert off.capabilities(GUEST_CSUM | GUEST_TSO4 | GUEST_ECN) == {"rx_csum", "rx_tso4", "rx_ecn"}


# -- negotiation: what is offered, the CLI flag, the stats names ---------------------------

def test_offloads_offered_unless_off():
    from vhu.config import UsageError, parse_args
    from vhu.protocol.backend import (OFFLOAD_FEATURES, SUPPORTED_FEATURES, negotiated_offloads)
    assert OFFLOAD_FEATURES & SUPPORTED_FEATURES == OFFLOAD_FEATURES
    assert negotiated_offloads(SUPPORTED_FEATURES) == [
        "CSUM", "GUEST_CSUM", "GUEST_TSO4", "GUEST_TSO6", "GUEST_ECN", "HOST_TSO4", "HOST_TSO6",
        "HOST_ECN"]
    assert negotiated_offloads(SUPPORTED_FEATURES & ~OFFLOAD_FEATURES) == []
    assert parse_args(["--socket", "a.sock"]).offloads is True
    assert parse_args(["--socket", "a.sock", "--offloads", "off"]).offloads is False
    assert parse_args(["--socket", "a.sock", "--offloads", "on"]).offloads is True
    with pytest.raises(UsageError, match="--offloads"):
        parse_args(["--socket", "a.sock", "--offloads", "maybe"])


def test_stats_json_has_offload_counters_and_the_drop_reason():
    import numpy as np
    from vhu import stats
    from vhu._ring import COUNTER_NAMES
    idx = {n: i for i, n in enumerate(COUNTER_NAMES)}
    snap = np.zeros((1, 2, len(COUNTER_NAMES)), dtype=np.uint64)
    snap[0, 1, idx["tx_gso"]] = 3
    snap[0, 1, idx["tx_bad_offload"]] = 2
    snap[0, 0, idx["rx_segmented"]] = 5
    p = stats.port_stats(snap, 0, 1, "vm.sock", True)
    assert p["offload"] == {"tx_gso": 3, "tx_csum": 0, "rx_gso": 0, "rx_csum": 0,
                            "rx_segmented": 5, "rx_csum_done": 0}
    assert p["drops_by_reason"]["bad_offload"] == 2 and p["drops"] == 2
    assert p["queues"][0]["offload"]["tx_gso"] == 3
