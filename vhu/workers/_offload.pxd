# virtio-net offloads in compiled code: the virtio_net_hdr a frame comes
# with (virtio 1.x 5.1.6), its validation, and the software fallback
# (checksum completion, TCP segmentation) for receivers that cannot take an
# offloaded frame. Pure functions over byte buffers: no ring, no I/O.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    VNET_F_NEEDS_CSUM = 1       # virtio_net_hdr.flags
    VNET_F_DATA_VALID = 2
    GSO_NONE = 0                # virtio_net_hdr.gso_type
    GSO_TCPV4 = 1
    GSO_UDP = 3
    GSO_TCPV6 = 4
    GSO_ECN = 0x80
    VNET_HDR_FIELDS = 10        # flags .. csum_offset (num_buffers follows in a 12-byte header)

# What one port can do, from its negotiated features (caps_of): what it may
# send us (TX_*) and what it takes from us (RX_*).
cdef enum:
    CAP_TX_CSUM = 1             # VIRTIO_NET_F_CSUM
    CAP_TX_TSO4 = 2             # HOST_TSO4 (with CSUM)
    CAP_TX_TSO6 = 4             # HOST_TSO6 (with CSUM)
    CAP_TX_ECN = 8              # HOST_ECN (with a HOST_TSO)
    CAP_RX_CSUM = 16            # GUEST_CSUM
    CAP_RX_TSO4 = 32            # GUEST_TSO4 (with GUEST_CSUM)
    CAP_RX_TSO6 = 64            # GUEST_TSO6 (with GUEST_CSUM)
    CAP_RX_ECN = 128            # GUEST_ECN (with a GUEST_TSO)
    # Linux never sends a smaller MSS (tcp_min_snd_mss); smaller ones would
    # only multiply the frames one TX chain turns into.
    MIN_GSO_SIZE = 48

# offload_check's verdicts (OFF_OK or why the header is not honoured).
cdef enum:
    OFF_OK = 0
    OFF_NOT_NEGOTIATED          # NEEDS_CSUM / a gso_type the port did not negotiate
    OFF_CSUM_RANGE              # csum_start + csum_offset + 2 past the frame
    OFF_GSO_WITHOUT_CSUM        # gso_type set without NEEDS_CSUM (5.1.6.2.1)
    OFF_GSO_SIZE                # gso_size 0 (or under MIN_GSO_SIZE)
    OFF_GSO_TYPE                # not TCPV4 / TCPV6 (UDP is not offered)
    OFF_NOT_TCP_IP              # a TSO frame that is not Ethernet + IPv4/IPv6 + TCP as it says
    OFF_CSUM_NOT_TCP            # csum_start/offset are not the TCP checksum field of that frame
    OFF_NO_PAYLOAD              # a TSO frame with no TCP payload to segment
    OFF_COUNT

cdef struct Offload:
    # The header fields (a private copy, host order) ...
    uint8_t flags
    uint8_t gso_type
    uint16_t hdr_len
    uint16_t gso_size
    uint16_t csum_start
    uint16_t csum_offset
    # ... and, for a TSO frame, where its headers are (offload_check)
    uint16_t l3                 # IP header
    uint16_t l4                 # TCP header
    uint16_t hl                 # first payload byte
    uint16_t nseg               # segments of gso_size (the last may be shorter)
    uint8_t v6

cdef uint32_t caps_of(uint64_t features) noexcept nogil
cdef void read_vnet_hdr(Offload *o, const uint8_t *h) noexcept nogil
cdef void write_vnet_hdr(const Offload *o, uint8_t *h) noexcept nogil
cdef uint32_t offload_need(const Offload *o) noexcept nogil
cdef int offload_check(Offload *o, const uint8_t *f, uint32_t length, uint32_t caps) noexcept nogil
cdef void csum_fill(uint8_t *f, uint32_t length, uint32_t start, uint32_t off) noexcept nogil
cdef uint32_t tso_segment(const uint8_t *f, uint32_t length, const Offload *o, uint32_t k,
                          uint8_t *out) noexcept nogil
