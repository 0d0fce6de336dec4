# VXLAN ports in the worker engine: the data path and the worker-side
# object (included by _engine.pyx after its helpers; the declarations and
# the design are in _vxlan_defs.pxi).
import ipaddress
import os
import sys


cdef inline uint64_t vx_mac(const uint8_t *p) noexcept nogil:
    return ((<uint64_t>p[0] << 40) | (<uint64_t>p[1] << 32) | (<uint64_t>p[2] << 24) |
            (<uint64_t>p[3] << 16) | (<uint64_t>p[4] << 8) | <uint64_t>p[5])


cdef inline uint32_t vx_fdb_hash(uint64_t mac) noexcept nogil:
    return <uint32_t>((mac * 0x9E3779B97F4A7C15ULL) >> 54) & (VX_FDB_SLOTS - 1)


cdef inline uint64_t vx_mix(uint64_t h, uint64_t v) noexcept nogil:
    h ^= v + 0x9E3779B97F4A7C15ULL + (h << 6) + (h >> 2)
    return h


cdef uint32_t vx_flow_hash(const uint8_t *f, uint32_t n) noexcept nogil:
    """A hash of the inner flow: MACs and EtherType, and for IPv4 the
    addresses, protocol and, for TCP, UDP and SCTP outside fragments, the
    ports (every fragment of a datagram hashes alike)."""
    cdef uint64_t h = vx_mix(0, vx_mac(f))
    cdef uint32_t ihl
    h = vx_mix(h, vx_mac(f + 6))
    h = vx_mix(h, (<uint64_t>f[12] << 8) | f[13])
    if n >= 34 and f[12] == 0x08 and f[13] == 0x00 and (f[14] >> 4) == 4:
        h = vx_mix(h, (<uint64_t>f[26] << 24) | (<uint64_t>f[27] << 16) |
                   (<uint64_t>f[28] << 8) | f[29])
        h = vx_mix(h, (<uint64_t>f[30] << 24) | (<uint64_t>f[31] << 16) |
                   (<uint64_t>f[32] << 8) | f[33])
        h = vx_mix(h, f[23])
        ihl = (f[14] & 15) * 4
        if ((f[23] == 6 or f[23] == 17 or f[23] == 132) and ihl >= 20 and
                (f[20] & 0x3F) == 0 and f[21] == 0 and n >= 14 + ihl + 4):
            h = vx_mix(h, (<uint64_t>f[14 + ihl] << 24) | (<uint64_t>f[15 + ihl] << 16) |
                       (<uint64_t>f[16 + ihl] << 8) | f[17 + ihl])
    h ^= h >> 33
    h *= 0xFF51AFD7ED558CCDULL
    h ^= h >> 33
    return <uint32_t>h


cdef int vx_fdb_lookup(VxPort *p, uint64_t mac, double t) noexcept nogil:
    cdef uint32_t h = vx_fdb_hash(mac), k
    cdef VxFdb *e
    for k in range(VX_FDB_PROBES):
        e = &p.fdb[(h + k) & (VX_FDB_SLOTS - 1)]
        if e.mac == mac:
            return e.remote if t - e.seen < p.ageing else -1
    return -1


cdef void vx_fdb_learn(VxPort *p, uint64_t mac, int remote, double t) noexcept nogil:
    """As the switch learns (vhu/workers/_engine.pyx mac_learn): a station
    that moved is followed at once; a new one takes an empty slot of its
    probe window, else the least recently seen."""
    cdef uint32_t h = vx_fdb_hash(mac), k
    cdef VxFdb *e
    cdef VxFdb *victim = NULL
    for k in range(VX_FDB_PROBES):
        e = &p.fdb[(h + k) & (VX_FDB_SLOTS - 1)]
        if e.mac == mac:
            e.remote = remote
            e.seen = t
            return
        if e.mac == 0:
            if victim == NULL or victim.mac != 0:
                victim = e
        elif victim == NULL or (victim.mac != 0 and e.seen < victim.seen):
            victim = e
    victim.mac = mac
    victim.remote = remote
    victim.seen = t


cdef void vx_count_macs(VxPort *p, double t) noexcept nogil:
    """Live learned MACs per remote into the shared counters (once a second)."""
    cdef int r, i
    cdef uint64_t n[VX_MAX_REMOTES]
    p.last_scan = t
    for r in range(p.nremotes):
        n[r] = 0
    for i in range(VX_FDB_SLOTS):
        if p.fdb[i].mac and t - p.fdb[i].seen < p.ageing and 0 <= p.fdb[i].remote < p.nremotes:
            n[p.fdb[i].remote] += 1
    for r in range(p.nremotes):
        p.rcnt[r * VR_COUNT + VR_MACS] = n[r]


cdef inline int vx_remote_of(VxPort *p, sockaddr_in *sa, socklen_t salen) noexcept nogil:
    cdef int r
    if salen < sizeof(sockaddr_in) or sa.sin_family != AF_INET:
        return -1
    for r in range(p.nremotes):
        if p.raddr[r] == sa.sin_addr.s_addr:
            return r
    return -1


cdef int vx_receive(VxPort *p, uint32_t batch, Seg *out, uint8_t *owner, uint32_t *handled,
                    double t) noexcept nogil:
    """One recvmmsg(2) on reader p's socket: the good inner frames into
    out[0..n) (pointing into p.rbuf, valid until the next call), owner[k]
    the index in p.shared of the port (VNI) frame k is for; the bad ones
    counted on that port's (or, with no port of their VNI, p's) counters.
    Returns n; *handled: datagrams read."""
    cdef int got, i, r, k, n = 0
    cdef uint32_t len_
    cdef const uint8_t *d
    cdef uint32_t *w
    cdef uint64_t src
    cdef VxPort *q
    for k in range(p.nshared):
        if t - p.shared[k].last_scan >= 1.0:
            vx_count_macs(p.shared[k], t)
    handled[0] = 0
    if p.rfd < 0:
        return 0
    for i in range(<int>batch):
        p.rmsg[i].msg_hdr.msg_name = &p.rsrc[i]
        p.rmsg[i].msg_hdr.msg_namelen = sizeof(sockaddr_in)
        p.rmsg[i].msg_hdr.msg_iov = &p.riov[i]
        p.rmsg[i].msg_hdr.msg_iovlen = 1
        p.rmsg[i].msg_hdr.msg_control = NULL
        p.rmsg[i].msg_hdr.msg_controllen = 0
        p.rmsg[i].msg_hdr.msg_flags = 0
    got = recvmmsg(p.rfd, p.rmsg, batch, MSG_DONTWAIT, NULL)
    if got <= 0:
        return 0
    handled[0] = <uint32_t>got
    for i in range(got):
        len_ = p.rmsg[i].msg_len
        d = <const uint8_t *>p.riov[i].iov_base
        w = <uint32_t *>p.riov[i].iov_base
        # The port of this VNI (the datagram's second word, reserved byte
        # included), else the reader stands for "none of ours".
        q = p
        k = 0
        if len_ >= VX_HDR:
            for k in range(p.nshared):
                if p.shared[k].hdr1 == w[1]:
                    q = p.shared[k]
                    break
            else:
                k = 0
        r = vx_remote_of(q, &p.rsrc[i], p.rmsg[i].msg_hdr.msg_namelen)
        if r < 0:
            q.rxcnt[C_VXLAN_FOREIGN] += 1     # not one of its VTEPs: never read further
            continue
        if (vhu_unlikely(p.rmsg[i].msg_hdr.msg_flags & MSG_TRUNC) or len_ < VX_HDR + VX_MIN_FRAME
                or len_ > VX_HDR + q.max_inner or w[0] != q.hdr0 or w[1] != q.hdr1):
            # Oversized (cut to the slot, or over this port's bound), short,
            # other flags, a VNI of no port here or a reserved byte set: the
            # kernel's vxlan drops these too.
            q.rxcnt[C_VXLAN_BAD] += 1
            q.rcnt[r * VR_COUNT + VR_RX_BAD] += 1
            continue
        out[n].ptr = <char *>d + VX_HDR
        out[n].len = len_ - VX_HDR
        owner[n] = <uint8_t>k
        q.rcnt[r * VR_COUNT + VR_RX_PACKETS] += 1
        q.rcnt[r * VR_COUNT + VR_RX_BYTES] += len_ - VX_HDR
        src = vx_mac(d + VX_HDR + 6)
        if not (d[VX_HDR + 6] & 1) and src != 0:     # never learn group addresses
            vx_fdb_learn(q, src, r, t)
        n += 1
    return n


cdef void vx_flush(VxPort *p, uint64_t *cnt) noexcept nogil:
    """Send what vx_queue queued: one sendmmsg(2) per send socket used."""
    cdef uint32_t count[VX_MAX_SEND]
    cdef uint32_t start[VX_MAX_SEND]
    cdef uint32_t i, s, k, off, n, sent
    cdef int r, rem
    cdef uint64_t blen
    if p.npend == 0:
        p.nslots = 0
        return
    for s in range(VX_MAX_SEND):
        count[s] = 0
    for i in range(p.npend):
        count[p.psock[i]] += 1
    k = 0
    for s in range(<uint32_t>p.nsend):
        start[s] = k
        k += count[s]
    for i in range(p.npend):          # stable: a flow's datagrams keep their order
        s = p.psock[i]
        p.fmsg[start[s]] = p.pmsg[i]
        p.fremote[start[s]] = p.premote[i]
        start[s] += 1
    k = 0
    for s in range(<uint32_t>p.nsend):
        n = count[s]
        off = 0
        while off < n:
            r = sendmmsg(p.sfd[s], p.fmsg + k + off, n - off, MSG_DONTWAIT)
            if r > 0:
                for i in range(off, off + <uint32_t>r):
                    rem = p.fremote[k + i]
                    blen = p.fmsg[k + i].msg_hdr.msg_iov.iov_len - VX_HDR
                    p.rcnt[rem * VR_COUNT + VR_TX_PACKETS] += 1
                    p.rcnt[rem * VR_COUNT + VR_TX_BYTES] += blen
                    cnt[C_RX_FRAMES] += 1
                    cnt[C_RX_BYTES] += blen
                off += <uint32_t>r
                continue
            if r < 0 and errno == EINTR:
                continue
            if r < 0 and (errno == EAGAIN or errno == ENOBUFS):
                cnt[C_RX_NO_ROOM] += n - off          # the socket's queue is full: drop the rest
                break
            if r < 0 and errno == EMSGSIZE:
                cnt[C_VXLAN_TOO_BIG] += 1             # over the path MTU: never fragmented
            else:
                cnt[C_RX_NO_ROOM] += 1
                p.rcnt[p.fremote[k + off] * VR_COUNT + VR_TX_ERRORS] += 1
            off += 1
        k += n
    p.npend = 0
    p.nslots = 0


cdef bint vx_queue(VxPort *p, uint64_t *cnt, const Seg *src, uint32_t nsrc, uint64_t skip,
                   int64_t flen) noexcept nogil:
    """Encapsulate one frame for the remote its destination MAC was learned
    behind (every remote if none, or a group address); sent by vx_flush."""
    cdef char *slot
    cdef Seg d
    cdef int r, rem
    cdef uint8_t sock
    cdef const uint8_t *f
    cdef iovec *iov
    cdef mmsghdr *m
    if p.nsend == 0:
        return False                  # closed
    if flen > p.max_inner:
        cnt[C_VXLAN_TOO_BIG] += 1     # does not fit the underlay: dropped, never fragmented
        return False
    if flen < VX_MIN_FRAME:
        cnt[C_DROP_FILTERED] += 1     # not an Ethernet frame
        return False
    if p.nslots >= MAX_BATCH:
        vx_flush(p, cnt)
    if p.nslots == 0:
        p.t = now()
    slot = p.tbuf + <size_t>p.nslots * p.slot
    (<uint32_t *>slot)[0] = p.hdr0
    (<uint32_t *>slot)[1] = p.hdr1
    d.ptr = slot + VX_HDR
    d.len = <uint32_t>flen
    copy_segs(&d, 1, 0, src, nsrc, skip, <uint64_t>flen)
    f = <const uint8_t *>(slot + VX_HDR)
    iov = &p.tiov[p.nslots]
    iov.iov_base = slot
    iov.iov_len = VX_HDR + <size_t>flen
    p.nslots += 1
    sock = <uint8_t>(vx_flow_hash(f, <uint32_t>flen) % <uint32_t>p.nsend)
    rem = -1 if (f[0] & 1) else vx_fdb_lookup(p, vx_mac(f), p.t)
    for r in range(p.nremotes):
        if rem >= 0 and r != rem:
            continue
        m = &p.pmsg[p.npend]
        if p.connected:
            m.msg_hdr.msg_name = NULL             # the socket's peer: its route is kept
            m.msg_hdr.msg_namelen = 0
        else:
            m.msg_hdr.msg_name = &p.rsa[r]
            m.msg_hdr.msg_namelen = sizeof(sockaddr_in)
        m.msg_hdr.msg_iov = iov
        m.msg_hdr.msg_iovlen = 1
        m.msg_hdr.msg_control = NULL
        m.msg_hdr.msg_controllen = 0
        m.msg_hdr.msg_flags = 0
        p.premote[p.npend] = r
        p.psock[p.npend] = sock
        p.npend += 1
    return True


cdef void vx_close_fds(VxPort *p) noexcept nogil:
    cdef int i
    if p.rfd >= 0:
        close(p.rfd)
        p.rfd = -1
    for i in range(VX_MAX_SEND):
        if p.sfd[i] >= 0:
            close(p.sfd[i])
            p.sfd[i] = -1
    p.nsend = 0


cdef class VxlanSocket:
    """A VXLAN port's sockets and state in a worker (vhu.workers.process
    binds it; the engine uses it from nogil code). Owns the fds it is given.

    recv_fd: UDP socket bound to local:port; send_fds: 1..VX_MAX_SEND UDP
    sockets bound to local (ephemeral ports), SO_NO_CHECK, IP_PMTUDISC_DO;
    vni; remotes: IPv4 addresses (str); port: the remotes' UDP port;
    max_inner: the largest inner frame (underlay MTU - 36); counters: a
    writable u64 array of at least VX_MAX_REMOTES x VR_COUNT (per remote)."""
    cdef VxPort p
    cdef object counters
    cdef readonly object remotes

    def __cinit__(self):
        cdef int i
        memset(&self.p, 0, sizeof(VxPort))
        self.p.rfd = -1
        for i in range(VX_MAX_SEND):
            self.p.sfd[i] = -1

    def __init__(self, int recv_fd, send_fds, uint32_t vni, remotes, int port,
                 uint32_t max_inner, counters, bint connected=False):
        cdef uint64_t[::1] cnt
        cdef int i
        cdef size_t slots
        send_fds = list(send_fds)
        try:
            remotes = [str(ipaddress.IPv4Address(str(r))) for r in remotes]
            cnt = counters
            if vni > 0xFFFFFF:
                raise ValueError("vni is 24 bits")
            if not 1 <= len(send_fds) <= VX_MAX_SEND:
                raise ValueError(f"1..{VX_MAX_SEND} send sockets")
            if not 1 <= len(remotes) <= VX_MAX_REMOTES:
                raise ValueError(f"1..{VX_MAX_REMOTES} remotes")
            if not 1 <= port <= 65535:
                raise ValueError("port is 1..65535")
            if not VX_MIN_FRAME <= max_inner <= MAX_FRAME_LEN:
                raise ValueError(f"max_inner must be {VX_MIN_FRAME}..{MAX_FRAME_LEN}")
            if cnt.shape[0] < VX_MAX_REMOTES * VR_COUNT:
                raise ValueError(f"counters: need {VX_MAX_REMOTES * VR_COUNT} u64s")
            if connected and len(remotes) != 1:
                raise ValueError("connected send sockets: for exactly one remote")
        except BaseException:
            for fd in [recv_fd] + send_fds:
                try:
                    os.close(fd)
                except (OSError, TypeError):
                    pass
            raise
        self.p.rfd = recv_fd
        self.p.ino = os.fstat(recv_fd).st_ino     # ports sharing this socket: the same inode
        for i, fd in enumerate(send_fds):
            self.p.sfd[i] = fd
        self.p.nsend = len(send_fds)
        self.remotes = tuple(remotes)
        self.counters = counters
        self.p.rcnt = &cnt[0]
        self.p.nremotes = len(remotes)
        self.p.connected = connected
        for i, r in enumerate(remotes):
            self.p.raddr[i] = int.from_bytes(ipaddress.IPv4Address(r).packed, sys.byteorder)
            self.p.rsa[i].sin_family = AF_INET
            self.p.rsa[i].sin_port = htons(<uint16_t>port)
            self.p.rsa[i].sin_addr.s_addr = self.p.raddr[i]
        self.p.hdr0 = htonl(0x08000000)
        self.p.hdr1 = htonl(vni << 8)
        self.p.max_inner = max_inner
        self.p.slot = (VX_HDR + max_inner + 63) & ~63U
        self.p.ageing = 300.0
        self.p.last_scan = 0
        slots = MAX_BATCH
        self.p.fdb = <VxFdb *>calloc(VX_FDB_SLOTS, sizeof(VxFdb))
        self.p.rbuf = <char *>malloc(slots * self.p.slot)
        self.p.tbuf = <char *>malloc(slots * self.p.slot)
        self.p.rmsg = <mmsghdr *>calloc(slots, sizeof(mmsghdr))
        self.p.riov = <iovec *>calloc(slots, sizeof(iovec))
        self.p.rsrc = <sockaddr_in *>calloc(slots, sizeof(sockaddr_in))
        self.p.tiov = <iovec *>calloc(slots, sizeof(iovec))
        self.p.pmsg = <mmsghdr *>calloc(slots * VX_MAX_REMOTES, sizeof(mmsghdr))
        self.p.fmsg = <mmsghdr *>calloc(slots * VX_MAX_REMOTES, sizeof(mmsghdr))
        self.p.premote = <int *>calloc(slots * VX_MAX_REMOTES, sizeof(int))
        self.p.fremote = <int *>calloc(slots * VX_MAX_REMOTES, sizeof(int))
        self.p.psock = <uint8_t *>calloc(slots * VX_MAX_REMOTES, 1)
        if (self.p.fdb == NULL or self.p.rbuf == NULL or self.p.tbuf == NULL or
                self.p.rmsg == NULL or self.p.riov == NULL or self.p.rsrc == NULL or
                self.p.tiov == NULL or self.p.pmsg == NULL or self.p.fmsg == NULL or
                self.p.premote == NULL or self.p.fremote == NULL or self.p.psock == NULL):
            raise MemoryError()
        for i in range(<int>slots):
            self.p.riov[i].iov_base = self.p.rbuf + <size_t>i * self.p.slot
            self.p.riov[i].iov_len = VX_HDR + max_inner

    @property
    def fd(self):
        """The receive socket (the engine watches it with epoll)."""
        return self.p.rfd

    @property
    def max_inner(self):
        return self.p.max_inner

    def fdb(self):
        """Live learned inner MACs: (mac (int), remote address, seconds since seen)."""
        cdef double t = now()
        return [(self.p.fdb[i].mac, self.remotes[self.p.fdb[i].remote], t - self.p.fdb[i].seen)
                for i in range(VX_FDB_SLOTS)
                if self.p.fdb[i].mac and t - self.p.fdb[i].seen < self.p.ageing]

    def close(self):
        """Close the sockets (the engine must no longer be bound to it)."""
        vx_close_fds(&self.p)

    def __dealloc__(self):
        vx_close_fds(&self.p)
        free(self.p.fdb)
        free(self.p.rbuf)
        free(self.p.tbuf)
        free(self.p.rmsg)
        free(self.p.riov)
        free(self.p.rsrc)
        free(self.p.tiov)
        free(self.p.pmsg)
        free(self.p.fmsg)
        free(self.p.premote)
        free(self.p.fremote)
        free(self.p.psock)
