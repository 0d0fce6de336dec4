# cython: language_level=3
"""virtio-net offloads: the virtio_net_hdr checked, and the software fallback.

Spec: virtio 1.x 5.1.6 ("Device Operation"), 5.1.6.2 (packet transmission:
what a driver may ask with flags, gso_type, gso_size, csum_start and
csum_offset) and 5.1.6.4 (packet receive: what a device may hand a driver
that negotiated GUEST_CSUM / GUEST_TSO4/6).

Trust: the header comes from a guest. offload_check honours it only if the
port negotiated what it asks (CSUM for NEEDS_CSUM, HOST_TSO4/6 and HOST_ECN
for a gso_type) and the frame is what it claims: the checksum field inside
the frame, and for TSO an Ethernet (one optional 802.1Q tag) + IPv4 (no
fragment) or IPv6 (TCP as next header) + TCP frame whose csum_start and
csum_offset name the TCP checksum, with a payload and a gso_size of at least
MIN_GSO_SIZE. hdr_len is a hint (GUEST_HDRLEN is not offered): never used.
Anything else is the caller's tx_bad_offload. Every offset the functions
below use was checked against the frame length here, on the worker's
private copy of the frame (the guest cannot change it after the check).

Software fallback, for a receiver that did not negotiate what a frame needs:
csum_fill finishes a partial checksum (as Linux skb_checksum_help: the sum
from csum_start to the end, the pseudo-header sum already in the field);
tso_segment cuts a TSO frame into gso_size segments as Linux's
tcp_gso_segment does: headers copied, IPv4 total length, ID (+1 per
segment) and header checksum, IPv6 payload length, TCP sequence numbers,
FIN and PSH only on the last segment, CWR only on the first, and each TCP
checksum computed in full.

Checksums are summed with native (little-endian) loads and stored with a
native store: the ones' complement sum is byte-order independent (RFC 1071
2.(B)), so no byte is swapped. Regions summed separately and combined
(pseudo-header, then the TCP segment) each start at an even offset.
"""
import time

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_FromStringAndSize

# Feature bits (vhu.protocol.messages.VirtioFeature): the ones caps_of reads.
cdef uint64_t F_CSUM = 1ULL << 0
cdef uint64_t F_GUEST_CSUM = 1ULL << 1
cdef uint64_t F_GUEST_TSO4 = 1ULL << 7
cdef uint64_t F_GUEST_TSO6 = 1ULL << 8
cdef uint64_t F_GUEST_ECN = 1ULL << 9
cdef uint64_t F_HOST_TSO4 = 1ULL << 11
cdef uint64_t F_HOST_TSO6 = 1ULL << 12
cdef uint64_t F_HOST_ECN = 1ULL << 13

REASONS = ("ok", "not_negotiated", "csum_range", "gso_without_csum", "gso_size", "gso_type",
           "not_tcp_ip", "csum_not_tcp", "no_payload")
assert len(REASONS) == OFF_COUNT
CAPS = {"tx_csum": CAP_TX_CSUM, "tx_tso4": CAP_TX_TSO4, "tx_tso6": CAP_TX_TSO6,
        "tx_ecn": CAP_TX_ECN, "rx_csum": CAP_RX_CSUM, "rx_tso4": CAP_RX_TSO4,
        "rx_tso6": CAP_RX_TSO6, "rx_ecn": CAP_RX_ECN}
CAPS_ALL = 0xFF
NEEDS_CSUM = VNET_F_NEEDS_CSUM
GSO = {"none": GSO_NONE, "tcpv4": GSO_TCPV4, "udp": GSO_UDP, "tcpv6": GSO_TCPV6, "ecn": GSO_ECN}
MIN_MSS = MIN_GSO_SIZE


cdef uint32_t caps_of(uint64_t features) noexcept nogil:
    """A port's capabilities from its negotiated features. A feature whose
    prerequisite (5.1.3.1) is missing counts as not negotiated."""
    cdef uint32_t c = 0
    if features & F_CSUM:
        c |= CAP_TX_CSUM
        if features & F_HOST_TSO4:
            c |= CAP_TX_TSO4
        if features & F_HOST_TSO6:
            c |= CAP_TX_TSO6
        if (features & F_HOST_ECN) and (c & (CAP_TX_TSO4 | CAP_TX_TSO6)):
            c |= CAP_TX_ECN
    if features & F_GUEST_CSUM:
        c |= CAP_RX_CSUM
        if features & F_GUEST_TSO4:
            c |= CAP_RX_TSO4
        if features & F_GUEST_TSO6:
            c |= CAP_RX_TSO6
        if (features & F_GUEST_ECN) and (c & (CAP_RX_TSO4 | CAP_RX_TSO6)):
            c |= CAP_RX_ECN
    return c


cdef inline uint16_t le16(const uint8_t *p) noexcept nogil:
    return <uint16_t>(p[0] | (<uint16_t>p[1] << 8))


cdef inline void put_le16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = v >> 8


cdef inline uint16_t be16(const uint8_t *p) noexcept nogil:
    return <uint16_t>((<uint16_t>p[0] << 8) | p[1])


cdef inline void put_be16(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = (v >> 8) & 0xFF
    p[1] = v & 0xFF


cdef void read_vnet_hdr(Offload *o, const uint8_t *h) noexcept nogil:
    """The first VNET_HDR_FIELDS bytes of a virtio_net_hdr (little-endian:
    VERSION_1, or a legacy x86 guest), copied out of guest memory by the caller."""
    o.flags = h[0]
    o.gso_type = h[1]
    o.hdr_len = le16(h + 2)
    o.gso_size = le16(h + 4)
    o.csum_start = le16(h + 6)
    o.csum_offset = le16(h + 8)
    o.l3 = o.l4 = o.hl = 0
    o.nseg = 1
    o.v6 = 0


cdef void write_vnet_hdr(const Offload *o, uint8_t *h) noexcept nogil:
    """The header a receiver that takes the frame as it is gets: only what
    was checked (NEEDS_CSUM, never a DATA_VALID the sender set); hdr_len is
    the real length of the headers of a TSO frame."""
    h[0] = o.flags & VNET_F_NEEDS_CSUM
    h[1] = o.gso_type
    put_le16(h + 2, o.hl if o.gso_type != GSO_NONE else 0)
    put_le16(h + 4, o.gso_size if o.gso_type != GSO_NONE else 0)
    put_le16(h + 6, o.csum_start)
    put_le16(h + 8, o.csum_offset)


cdef uint32_t offload_need(const Offload *o) noexcept nogil:
    """What a receiver must have negotiated to take the frame as it is."""
    cdef uint32_t need = 0
    if o.gso_type != GSO_NONE:
        need = CAP_RX_CSUM | (CAP_RX_TSO6 if o.v6 else CAP_RX_TSO4)
        if o.gso_type & GSO_ECN:
            need |= CAP_RX_ECN
    elif o.flags & VNET_F_NEEDS_CSUM:
        need = CAP_RX_CSUM
    return need


cdef int offload_check(Offload *o, const uint8_t *f, uint32_t length, uint32_t caps) noexcept nogil:
    """OFF_OK if the header may be honoured for this frame (f, length: the
    private copy), filling o's offsets for a TSO frame; else why not."""
    cdef uint32_t base, et, l3, l4, thl, ihl, payload
    o.flags &= VNET_F_NEEDS_CSUM          # the device ignores the others (5.1.6.2.2)
    if o.gso_type == GSO_NONE:
        if not o.flags:
            return OFF_OK
        if not caps & CAP_TX_CSUM:
            return OFF_NOT_NEGOTIATED
        if <uint32_t>o.csum_start + o.csum_offset + 2 > length:
            return OFF_CSUM_RANGE
        return OFF_OK
    base = o.gso_type & ~GSO_ECN
    if base == GSO_TCPV4:
        if not caps & CAP_TX_TSO4:
            return OFF_NOT_NEGOTIATED
    elif base == GSO_TCPV6:
        if not caps & CAP_TX_TSO6:
            return OFF_NOT_NEGOTIATED
    elif base == GSO_UDP:
        return OFF_NOT_NEGOTIATED        # HOST_UFO is not offered
    else:
        return OFF_GSO_TYPE
    if (o.gso_type & GSO_ECN) and not caps & CAP_TX_ECN:
        return OFF_NOT_NEGOTIATED
    if not o.flags:
        return OFF_GSO_WITHOUT_CSUM
    if o.gso_size < MIN_GSO_SIZE:
        return OFF_GSO_SIZE
    if length < 14:
        return OFF_NOT_TCP_IP
    l3 = 14
    et = be16(f + 12)
    if et == 0x8100:                      # one 802.1Q tag
        if length < 18:
            return OFF_NOT_TCP_IP
        et = be16(f + 16)
        l3 = 18
    if base == GSO_TCPV4:
        if et != 0x0800 or length < l3 + 20 or (f[l3] >> 4) != 4:
            return OFF_NOT_TCP_IP
        ihl = (f[l3] & 0x0F) * 4
        if ihl < 20 or f[l3 + 9] != 6 or (be16(f + l3 + 6) & 0x3FFF) != 0:
            return OFF_NOT_TCP_IP          # options too short, not TCP, or a fragment
        l4 = l3 + ihl
        o.v6 = 0
    else:
        if et != 0x86DD or length < l3 + 40 or (f[l3] >> 4) != 6 or f[l3 + 6] != 6:
            return OFF_NOT_TCP_IP          # extension headers are not segmented
        l4 = l3 + 40
        o.v6 = 1
    if l4 + 20 > length:
        return OFF_NOT_TCP_IP
    thl = (f[l4 + 12] >> 4) * 4
    if thl < 20 or l4 + thl > length:
        return OFF_NOT_TCP_IP
    if o.csum_start != l4 or o.csum_offset != 16:
        return OFF_CSUM_NOT_TCP
    payload = length - l4 - thl
    if payload == 0:
        return OFF_NO_PAYLOAD
    o.l3 = <uint16_t>l3
    o.l4 = <uint16_t>l4
    o.hl = <uint16_t>(l4 + thl)
    o.nseg = <uint16_t>((payload + o.gso_size - 1) // o.gso_size)
    return OFF_OK


cdef inline uint64_t sum_add(uint64_t a, uint64_t b) noexcept nogil:
    """Ones' complement addition of two 64-bit partial sums (end-around carry)."""
    a += b
    return a + (a < b)


cdef uint64_t sum_bytes(const uint8_t *p, uint32_t n) noexcept nogil:
    """Partial ones' complement sum of n bytes, native loads (see the module
    docstring); a trailing odd byte is the high byte of a zero-padded word."""
    cdef uint64_t s = 0, w = 0
    cdef uint32_t w32 = 0
    cdef uint16_t w16 = 0
    while n >= 8:
        memcpy(&w, p, 8)
        s = sum_add(s, w)
        p += 8
        n -= 8
    if n >= 4:
        memcpy(&w32, p, 4)
        s = sum_add(s, w32)
        p += 4
        n -= 4
    if n >= 2:
        memcpy(&w16, p, 2)
        s = sum_add(s, w16)
        p += 2
        n -= 2
    if n:
        s = sum_add(s, p[0])               # native little-endian: the low byte
    return s


cdef inline uint16_t sum_final(uint64_t s) noexcept nogil:
    """Fold to 16 bits and complement: the checksum, to be stored natively."""
    s = (s & 0xFFFFFFFFULL) + (s >> 32)
    s = (s & 0xFFFFFFFFULL) + (s >> 32)
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return <uint16_t>(~s & 0xFFFF)


cdef void csum_fill(uint8_t *f, uint32_t length, uint32_t start, uint32_t off) noexcept nogil:
    """Finish a partial checksum in place (offload_check made sure
    start + off + 2 <= length): the field holds the pseudo-header sum."""
    cdef uint16_t c = sum_final(sum_bytes(f + start, length - start))
    if c == 0:
        c = 0xFFFF           # as Linux (CSUM_MANGLED_0): 0 means "no checksum" to UDP
    memcpy(f + start + off, &c, 2)


cdef uint32_t tso_segment(const uint8_t *f, uint32_t length, const Offload *o, uint32_t k,
                          uint8_t *out) noexcept nogil:
    """Segment k (0 .. o.nseg-1) of the TSO frame f into out (room for
    `length` bytes); returns its length."""
    cdef uint32_t mss = o.gso_size
    cdef uint32_t payload = length - o.hl
    cdef uint32_t start = k * mss
    cdef uint32_t plen = payload - start if payload - start < mss else mss
    cdef uint32_t n = o.hl + plen
    cdef uint32_t seq, tcp_len = n - o.l4
    cdef uint8_t *ip = out + o.l3
    cdef uint8_t *th = out + o.l4
    cdef uint8_t pseudo[40]
    cdef uint16_t c
    cdef uint64_t s
    memcpy(out, f, o.hl)
    memcpy(out + o.hl, f + o.hl + start, plen)
    if not o.v6:
        put_be16(ip + 2, n - o.l3)
        put_be16(ip + 4, be16(ip + 4) + k)
        ip[10] = ip[11] = 0
        c = sum_final(sum_bytes(ip, o.l4 - o.l3))
        memcpy(ip + 10, &c, 2)
        memcpy(pseudo, ip + 12, 8)          # source, destination
        pseudo[8] = 0
        pseudo[9] = 6
        put_be16(pseudo + 10, tcp_len)
        s = sum_bytes(pseudo, 12)
    else:
        put_be16(ip + 4, n - o.l3 - 40)
        memcpy(pseudo, ip + 8, 32)
        pseudo[32] = pseudo[33] = 0
        put_be16(pseudo + 34, tcp_len)
        pseudo[36] = pseudo[37] = pseudo[38] = 0
        pseudo[39] = 6
        s = sum_bytes(pseudo, 40)
    seq = ((<uint32_t>th[4] << 24) | (<uint32_t>th[5] << 16) | (<uint32_t>th[6] << 8) | th[7])
    seq += start
    th[4] = seq >> 24
    th[5] = (seq >> 16) & 0xFF
    th[6] = (seq >> 8) & 0xFF
    th[7] = seq & 0xFF
    if k + 1 < o.nseg:
        th[13] &= ~0x09                     # FIN, PSH: the last segment's
    if k > 0:
        th[13] &= ~0x80                     # CWR: the first segment's
    th[16] = th[17] = 0
    c = sum_final(sum_add(s, sum_bytes(th, tcp_len)))
    memcpy(th + 16, &c, 2)
    return n


# -- for tests and tools: the same code on Python bytes --------------------

def capabilities(features):
    """caps_of(features) as a set of CAPS names."""
    cdef uint32_t c = caps_of(<uint64_t>int(features))
    return {name for name, bit in CAPS.items() if c & bit}


cdef int _check(Offload *o, const uint8_t[:] frame, int flags, int gso_type, int gso_size,
                int csum_start, int csum_offset, uint32_t caps) except -2:
    cdef uint8_t h[VNET_HDR_FIELDS]
    if frame.shape[0] > 65535:
        raise ValueError("a frame is at most 65535 bytes")
    h[0] = flags
    h[1] = gso_type
    put_le16(h + 2, 0)
    put_le16(h + 4, gso_size)
    put_le16(h + 6, csum_start)
    put_le16(h + 8, csum_offset)
    read_vnet_hdr(o, h)
    if frame.shape[0] == 0:
        return offload_check(o, h, 0, caps)
    return offload_check(o, &frame[0], <uint32_t>frame.shape[0], caps)


def check(const uint8_t[:] frame, int flags=0, int gso_type=0, int gso_size=0, int csum_start=0,
          int csum_offset=0, uint32_t caps=CAPS_ALL):
    """offload_check on a frame and header fields: a REASONS name."""
    cdef Offload o
    return REASONS[_check(&o, frame, flags, gso_type, gso_size, csum_start, csum_offset, caps)]


def header_out(const uint8_t[:] frame, int flags=0, int gso_type=0, int gso_size=0,
               int csum_start=0, int csum_offset=0):
    """The 10 header bytes a receiver that takes the frame as it is gets."""
    cdef Offload o
    cdef uint8_t h[VNET_HDR_FIELDS]
    r = _check(&o, frame, flags, gso_type, gso_size, csum_start, csum_offset, CAPS_ALL)
    if r != OFF_OK:
        raise ValueError(REASONS[r])
    write_vnet_hdr(&o, h)
    return PyBytes_FromStringAndSize(<char *>h, VNET_HDR_FIELDS)


def segment(const uint8_t[:] frame, int gso_type, int gso_size, int csum_start, int csum_offset,
            int flags=VNET_F_NEEDS_CSUM):
    """The frames tso_segment makes of a TSO frame (ValueError: the header
    is not honoured, with offload_check's reason)."""
    cdef Offload o
    cdef uint32_t k, n
    cdef bytearray out = bytearray(frame.shape[0])
    r = _check(&o, frame, flags, gso_type, gso_size, csum_start, csum_offset, CAPS_ALL)
    if r != OFF_OK or gso_type == GSO_NONE:
        raise ValueError(REASONS[r] if r != OFF_OK else "not a TSO frame")
    segs = []
    for k in range(o.nseg):
        n = tso_segment(&frame[0], <uint32_t>frame.shape[0], &o, k, <uint8_t *>(<char *>out))
        segs.append(bytes(out[:n]))
    return segs


def fill_checksum(const uint8_t[:] frame, int csum_start, int csum_offset):
    """The frame with its partial checksum finished (csum_fill)."""
    cdef Offload o
    cdef bytearray out = bytearray(frame)
    r = _check(&o, frame, VNET_F_NEEDS_CSUM, GSO_NONE, 0, csum_start, csum_offset, CAPS_ALL)
    if r != OFF_OK:
        raise ValueError(REASONS[r])
    csum_fill(<uint8_t *>(<char *>out), <uint32_t>len(out), csum_start, csum_offset)
    return bytes(out)


def segment_rate(const uint8_t[:] frame, int gso_type, int gso_size, int csum_start,
                 int csum_offset, double seconds=1.0):
    """perf/: segment the frame over and over for `seconds` (no GIL, into
    one buffer, every checksum computed): (frames, segments, seconds taken)."""
    cdef Offload o
    cdef uint32_t k, length = <uint32_t>frame.shape[0]
    cdef uint64_t frames = 0, segs = 0
    cdef bytearray out = bytearray(max(frame.shape[0], 1))
    cdef uint8_t *buf = <uint8_t *>(<char *>out)
    cdef const uint8_t *f
    cdef double t0, t
    r = _check(&o, frame, VNET_F_NEEDS_CSUM, gso_type, gso_size, csum_start, csum_offset, CAPS_ALL)
    if r != OFF_OK or gso_type == GSO_NONE:
        raise ValueError(REASONS[r] if r != OFF_OK else "not a TSO frame")
    f = &frame[0]
    t0 = time.perf_counter()
    t = t0
    with nogil:
        while True:
            for k in range(o.nseg):
                tso_segment(f, length, &o, k, buf)
            frames += 1
            segs += o.nseg
            if (frames & 63) == 0:
                with gil:
                    t = time.perf_counter()
                if t - t0 >= seconds:
                    break
    return frames, segs, t - t0
