# VXLAN ports in the worker engine, declarations (included by _engine.pyx
# before its Binding struct; the code is _vxlan.pxi): a binding
# that is a VXLAN tunnel endpoint instead of rings (vhu.vxlan, vhu.vxlanport).
#
# Receive: one recvmmsg(2) per batch on the socket bound to local:port. A
# datagram is dropped and counted unless it comes from a listed remote
# (vxlan_foreign), fits the receive slot, carries a header as the kernel's
# vxlan accepts it (the I flag alone, this VNI, zero reserved byte) and an
# inner frame of at least an Ethernet header (vxlan_bad). The inner frame is
# then a frame like a guest's: the same apps and stages decide on it.
#
# Send: a frame for the port is copied (private: decided on and sent from
# this copy) behind the 8-byte header into a slot of the port's send buffer;
# its destination MAC, looked up in the port's own table of inner source
# MACs learned per remote (ageing as the switch's), names one remote, or
# every remote for broadcast, multicast and unknown unicast. At the end of
# the batch (dispatch) one sendmmsg(2) per send socket carries them all.
#
# Source ports: the kernel's vxlan hashes the inner flow into a port of
# net.ipv4.ip_local_port_range. vhu has VX_MAX_SEND UDP sockets bound to
# ephemeral ports of that same range and picks the socket by a hash of the
# inner flow: a flow keeps one source port (no reordering across ECMP
# paths), flows spread over several. The send sockets also spread the
# kernel's per-socket send work. They send with SO_NO_CHECK (UDP checksum
# zero, as RFC 7348 allows on IPv4 and the kernel's vxlan does by default)
# and IP_PMTUDISC_DO (never fragmented: a datagram over the path MTU fails
# with EMSGSIZE and is counted as vxlan_too_big). UDP_SEGMENT is not used:
# the kernel refuses it (EINVAL) on a socket with SO_NO_CHECK.
from libc.errno cimport EMSGSIZE, ENOBUFS

cdef extern from "<sys/uio.h>" nogil:
    cdef struct iovec:
        void *iov_base
        size_t iov_len

cdef extern from "<netinet/in.h>" nogil:
    cdef struct in_addr:
        uint32_t s_addr
    cdef struct sockaddr_in:
        unsigned short sin_family
        uint16_t sin_port
        in_addr sin_addr
    uint16_t htons(uint16_t)
    uint32_t htonl(uint32_t)

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    cdef struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    cdef struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int recvmmsg(int fd, mmsghdr *vmessages, unsigned int vlen, int flags, timespec *timeout)
    int sendmmsg(int fd, mmsghdr *vmessages, unsigned int vlen, int flags)
    int getsockopt(int fd, int level, int optname, void *optval, socklen_t *optlen)
    enum: AF_INET, MSG_DONTWAIT, MSG_TRUNC, SOL_SOCKET, SO_ERROR

cdef enum:
    VX_MAX_REMOTES = 32       # vhu.vxlan.MAX_REMOTES
    VX_MAX_SEND = 8           # vhu.vxlan.SEND_SOCKETS
    VX_HDR = 8
    VX_MIN_FRAME = 14
    VX_FDB_SLOTS = 1024       # power of two: inner MACs learned per VXLAN port
    VX_FDB_PROBES = 8
    # Per-remote counters (vhu.vxlan.REMOTE_COUNTERS order).
    VR_RX_PACKETS = 0
    VR_RX_BYTES = 1
    VR_TX_PACKETS = 2
    VR_TX_BYTES = 3
    VR_MACS = 4               # live learned MACs behind the remote (recounted once a second)
    VR_TX_ERRORS = 5          # datagrams the kernel refused (not EMSGSIZE / full queue)
    VR_RX_BAD = 6             # datagrams from the remote dropped as vxlan_bad
    VR_COUNT = 8
    VX_MAX_SHARED = 16        # VXLAN ports (VNIs) sharing one local address and UDP port

cdef struct VxFdb:
    uint64_t mac              # 0: empty
    int remote
    double seen

cdef struct VxPort:
    int rfd                   # bound to local:port: every datagram comes in here
    int sfd[VX_MAX_SEND]
    int nsend
    uint32_t hdr0             # the header's two words as they are in memory
    uint32_t hdr1
    int nremotes
    uint32_t raddr[VX_MAX_REMOTES]          # s_addr (network order)
    sockaddr_in rsa[VX_MAX_REMOTES]         # where datagrams to each remote go
    uint64_t *rcnt            # nremotes x VR_COUNT (shared memory the master reads)
    uint32_t max_inner        # largest inner frame either way (underlay MTU - 36)
    uint32_t slot             # VX_HDR + max_inner
    double ageing
    double last_scan
    VxFdb *fdb
    char *rbuf                # MAX_BATCH slots: received datagrams
    mmsghdr *rmsg
    iovec *riov
    sockaddr_in *rsrc
    char *tbuf                # MAX_BATCH slots: encapsulated frames waiting for sendmmsg
    iovec *tiov
    uint32_t nslots           # slots used since the last flush
    double t                  # the clock at the first frame since the last flush
    mmsghdr *pmsg             # pending datagrams: MAX_BATCH x VX_MAX_REMOTES
    int *premote
    uint8_t *psock
    uint32_t npend
    bint connected            # the send sockets are connected to the one remote: no msg_name
    mmsghdr *fmsg             # ... ordered by send socket at flush
    int *fremote
    # Ports (VNIs) on one local address and UDP port share its socket: the
    # first bound reads for all of them (set_bindings groups them by the
    # socket's inode) and hands each datagram to the port of its VNI.
    uint64_t ino              # the receive socket's inode
    bint reader
    bint write_only           # another worker reads the socket: this one only sends
    int nshared               # reader: ports in its group, itself first
    VxPort *shared[VX_MAX_SHARED]
    int shared_bind[VX_MAX_SHARED]          # ... and their bindings
    uint64_t *rxcnt           # the binding's "from the port" counters (bad, foreign)
