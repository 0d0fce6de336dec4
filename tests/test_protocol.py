"""vhu.protocol without sockets: framing, the dispatcher, the virtio-net back-end state.

The QEMU 7.2 and DPDK 22.11 sessions are replayed from the traces in the
reference material (shared/reference/trace-*.txt), with the feature masks a
real front-end would send to *our* offer. fds are eventfds and memfds; every
test checks that the process holds no more fds at its end than at its start.
"""
import logging
import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from vhu.protocol.backend import (
    OFFLOAD_FEATURES, SUPPORTED_FEATURES, SUPPORTED_PROTOCOL_FEATURES, BackendConfig,
    NetBackend, NullHooks,
    RingConfig, validate_regions,
)
from vhu.protocol.dispatch import Dispatcher
from vhu.protocol.messages import (
    FLAG_NEED_REPLY, HEADER, MAX_FDS, MemoryRegion, MemoryTable, ProtocolError,
    ProtocolFeature as PF, Request as R, SingleMemoryRegion, U64, VirtioFeature as VF,
    VringAddr, VringFile, VringState, mask,
)
from vhu.protocol.table import TABLE
from vhu.protocol.wire import FramingError, MessageReader, pack_reply, pack_request


def fds_open():
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_fd_leak():
    before = fds_open()
    yield
    leaked = fds_open() - before
    assert not leaked, f"fds leaked: {sorted(leaked)}"


def is_closed(fd):
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def efd():
    return os.eventfd(0, os.EFD_CLOEXEC)


def memfd(size=0x1000):
    fd = os.memfd_create("vhu-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def u64(v):
    return U64(v).pack()


def state(index, num=0):
    return VringState(index, num).pack()


def vfile(index, nofd=False):
    return VringFile(index, nofd).pack()


def table(*regions):
    return MemoryTable(tuple(MemoryRegion(*r) for r in regions)).pack()


def single(gpa, size, uva, off=0):
    return SingleMemoryRegion(MemoryRegion(gpa, size, uva, off)).pack()


def ack(request, status=0):
    return pack_reply(request, u64(status))


class Recorder(NullHooks):
    """Hooks that log every call and check that the fds they are shown are open."""

    def __init__(self):
        self.calls = []
        self.stop_at = {}
        self.refuse_memory = None
        self.fail_ring = None

    def memory_table_changed(self, regions):
        for r in regions:
            os.fstat(r.fd)
        if self.refuse_memory:
            raise ValueError(self.refuse_memory)
        self.calls.append(("mem", [tuple(r[1:]) for r in regions]))

    def ring_changed(self, index, ring):
        for fd in (ring.kick_fd, ring.call_fd, ring.err_fd):
            if fd >= 0:
                os.fstat(fd)
        if self.fail_ring:
            raise RuntimeError(self.fail_ring)
        self.calls.append(("ring", index, ring))

    def ring_stop(self, index):
        self.calls.append(("stop", index))
        return self.stop_at.get(index)

    def status_changed(self, status):
        self.calls.append(("status", status))

    def reset(self):
        self.calls.append(("reset",))

    def of(self, kind, index=None):
        return [c for c in self.calls if c[0] == kind and (index is None or c[1] == index)]


class Peer:
    """A front-end's side of the conversation, without a socket."""

    def __init__(self, **config):
        self.hooks = Recorder()
        self.dev = NetBackend(BackendConfig(**config), self.hooks)
        self.disp = Dispatcher(self.dev)

    def raw(self, request, payload=b"", fds=(), need_reply=False, flags=0):
        return self.disp.receive(pack_request(request, payload, need_reply=need_reply,
                                              flags=flags), list(fds))

    def send(self, request, payload=b"", fds=(), need_reply=False, flags=0):
        out = self.raw(request, payload, fds, need_reply, flags)
        assert out.close is None, out.close
        return out.reply

    def negotiate(self, protocol=SUPPORTED_PROTOCOL_FEATURES, features=None):
        self.send(R.GET_FEATURES)
        self.send(R.GET_PROTOCOL_FEATURES)
        self.send(R.SET_PROTOCOL_FEATURES, u64(protocol))
        self.send(R.SET_OWNER)
        if features is not None:
            self.send(R.SET_FEATURES, u64(features))

    def ring(self, index):
        return self.dev.ring_config(index)

    def close(self):
        self.disp.close()


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.close()
    assert not p.dev.owned_fds()


@pytest.fixture
def acked(peer):
    """A peer that negotiated everything we offer for split rings, with one 16 MiB
    region at uva 0x10000000."""
    peer.negotiate(features=SUPPORTED_FEATURES & ~(1 << VF.RING_PACKED))
    peer.send(R.SET_MEM_TABLE, table((0, 0x1000000, 0x10000000, 0)), [memfd()])
    return peer


def setup_ring(p, index, num=256, desc=None, kick=True):
    desc = 0x10000000 + 0x10000 * index if desc is None else desc
    assert p.send(R.SET_VRING_NUM, state(index, num)) == b""
    p.send(R.SET_VRING_BASE, state(index, 0))
    p.send(R.SET_VRING_ADDR, VringAddr(index, 0, desc, desc + 0x2000, desc + 0x1000, 0).pack())
    if kick:
        p.send(R.SET_VRING_KICK, vfile(index), [efd()])
    p.send(R.SET_VRING_CALL, vfile(index), [efd()])


# -- wire structs and table ------------------------------------------------------

def test_struct_sizes_and_table_names():
    assert HEADER.size == 12
    assert (U64.SIZE, VringState.SIZE, VringAddr.SIZE, MemoryRegion.SIZE) == (8, 8, 40, 32)
    assert SingleMemoryRegion.SIZE == 40 and MemoryTable.MAX_SIZE == 8 + 8 * 32
    assert R.SET_BACKEND_REQ_FD == 21 and R.GET_MAX_MEM_SLOTS == 36 and R.GET_STATUS == 40
    assert (VF.VERSION_1, VF.MRG_RXBUF, VF.EVENT_IDX, VF.RING_PACKED) == (32, 15, 29, 34)
    assert (PF.CONFIGURE_MEM_SLOTS, PF.STATUS, PF.BACKEND_REQ) == (15, 16, 5)
    for code, row in TABLE.items():
        assert row.handler == R(code).name.lower()
    for name in ("set_vring_kick", "get_vring_base", "add_mem_reg", "set_status"):
        assert callable(getattr(NetBackend, name))


def test_payload_unpack_validates():
    with pytest.raises(ProtocolError):
        VringAddr.unpack(b"\0" * 39)
    with pytest.raises(ProtocolError):
        VringFile.unpack(u64(0x200))                       # reserved bit
    assert VringFile.unpack(u64(0x103)) == VringFile(3, True)
    with pytest.raises(ProtocolError):
        MemoryTable.unpack(struct.pack("=II", 0, 0) + b"\0" * 32)   # 0 regions
    with pytest.raises(ProtocolError):
        MemoryTable.unpack(struct.pack("=II", 2, 0) + b"\0" * 32)   # says 2, carries 1
    full = struct.pack("=II", 1, 0) + MemoryRegion(0, 1, 2, 3).pack() + b"\0" * 32 * 7
    assert MemoryTable.unpack(full).regions == (MemoryRegion(0, 1, 2, 3),)


# -- framing ----------------------------------------------------------------------

def test_reader_reassembles_byte_by_byte_and_attaches_fds():
    a = pack_request(R.SET_VRING_CALL, vfile(0))
    b = pack_request(R.GET_FEATURES)
    r = MessageReader()
    fd = efd()
    out = r.feed(a[:1], [fd])
    for i in range(1, len(a)):
        out += r.feed(a[i:i + 1])
    out += r.feed(b)
    assert [m.request for m in out] == [R.SET_VRING_CALL, R.GET_FEATURES]
    assert out[0].fds == [fd] and out[1].fds == []
    assert out[0].payload == vfile(0)
    out[0].close_fds()


def test_reader_gives_fds_to_the_message_starting_in_the_chunk():
    a = pack_request(R.SET_OWNER)
    b = pack_request(R.SET_VRING_KICK, vfile(1))
    r = MessageReader()
    assert r.feed(a[:5]) == []
    fd = efd()
    out = r.feed(a[5:] + b, [fd])                          # tail of a, then all of b
    assert out[0].fds == [] and out[1].fds == [fd]
    out[1].close_fds()
    fd = efd()
    assert r.feed(b[:3]) == []
    out = r.feed(b[3:], [fd])                              # tail only: b's own fds
    assert out[0].fds == [fd]
    out[0].close_fds()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=30))
def test_reader_any_split(cuts):
    stream = b"".join(pack_request(req, payload) for req, payload in (
        (R.GET_FEATURES, b""), (R.SET_VRING_ADDR, VringAddr(1, 0, 2, 3, 4, 5).pack()),
        (R.SET_MEM_TABLE, table((0, 0x1000, 0x2000, 0))), (99, b"xyz")))
    r, out, pos = MessageReader(), [], 0
    for c in cuts + [len(stream)]:
        out += r.feed(stream[pos:pos + c])
        pos += c
    assert [(int(m.request), len(m.payload)) for m in out] == [(1, 0), (9, 40), (5, 40), (99, 3)]
    assert r.buffered == 0


def test_reader_rejects_bad_version_oversize_and_too_many_fds():
    r = MessageReader()
    fd = efd()
    with pytest.raises(FramingError, match="version"):
        r.feed(HEADER.pack(R.GET_FEATURES, 0x2, 0), [fd])
    assert is_closed(fd)
    with pytest.raises(FramingError):                      # dead for good
        r.feed(pack_request(R.GET_FEATURES))
    with pytest.raises(FramingError, match="cap"):
        MessageReader().feed(HEADER.pack(R.SET_CONFIG, 1, 4097))
    fds = [efd() for _ in range(MAX_FDS + 1)]
    with pytest.raises(FramingError, match="fds"):
        MessageReader().feed(pack_request(R.SET_MEM_TABLE, table((0, 1, 0, 0))), fds)
    assert all(is_closed(fd) for fd in fds)


def test_reader_close_drops_partial_fds():
    r = MessageReader()
    fd = efd()
    r.feed(pack_request(R.SET_VRING_CALL, vfile(0))[:4], [fd])
    r.close()
    assert is_closed(fd)


# -- replays of real front-ends ------------------------------------------------------

QEMU_REGIONS = ((0x0, 0xa0000, 0x7f47ebfff000, 0x0),
                (0xc0000, 0xff40000, 0x7f47ec0bf000, 0xc0000))
# Ring addresses: the back-end's mapped addresses in the trace, back in QEMU's address space.
QEMU_RINGS = {0: (0x7f47ee9df000, 0x7f47ee9e0000, 0x7f47ee9e0240),
              1: (0x7f47ee9e1000, 0x7f47ee9e2000, 0x7f47ee9e2240)}


def test_qemu_7_2_guest_boot(peer):
    p, h = peer, peer.hooks
    # +RING_PACKED, IN_ORDER, MTU, LOG_ALL, and the offloads (OFFLOAD_FEATURES)
    assert p.send(R.GET_FEATURES) == pack_reply(R.GET_FEATURES, u64(0xD74408008 | OFFLOAD_FEATURES))
    # +MTU, RARP, LOG_SHMFD
    assert p.send(R.GET_PROTOCOL_FEATURES) == pack_reply(R.GET_PROTOCOL_FEATURES, u64(0x1803f))
    proto = 0x10cbf & SUPPORTED_PROTOCOL_FEATURES          # what QEMU acks of our offer
    assert p.send(R.SET_PROTOCOL_FEATURES, u64(proto)) == b""
    assert p.dev.acked_protocol_features == 0x1003f
    assert p.send(R.GET_QUEUE_NUM) == pack_reply(R.GET_QUEUE_NUM, u64(8))
    req = efd()
    assert p.send(R.SET_BACKEND_REQ_FD, fds=[req], need_reply=True) == ack(R.SET_BACKEND_REQ_FD)
    assert p.dev.backend_req_fd == req
    p.send(R.SET_OWNER)
    p.send(R.GET_FEATURES)
    early_calls = {}
    for i in (0, 1):
        early_calls[i] = efd()
        p.send(R.SET_VRING_CALL, vfile(i), [early_calls[i]])
        p.send(R.SET_VRING_ERR, vfile(i), [efd()])
    for _ in range(5):
        for i in (0, 1):
            p.send(R.SET_VRING_ENABLE, state(i, 1))
    assert len(h.of("ring", 0)) == 3                       # call, err, enable: once each
    features = 0x17020e783 & SUPPORTED_FEATURES
    p.send(R.SET_FEATURES, u64(features))
    assert p.dev.acked_features == 0x170008000 | (0x17020e783 & OFFLOAD_FEATURES)
    assert p.send(R.GET_STATUS) == pack_reply(R.GET_STATUS, u64(0))
    p.send(R.SET_STATUS, u64(0x8))
    mem = [memfd(), memfd()]
    assert p.send(R.SET_MEM_TABLE, table(*QEMU_REGIONS), mem, need_reply=True) == \
        ack(R.SET_MEM_TABLE)
    assert h.of("mem") == [("mem", list(QEMU_REGIONS))]
    for i, (desc, avail, used) in QEMU_RINGS.items():
        p.send(R.SET_VRING_NUM, state(i, 256))
        p.send(R.SET_VRING_BASE, state(i, 0))
        p.send(R.SET_VRING_ADDR, VringAddr(i, 0, desc, used, avail, 0).pack())
        assert not p.ring(i).started
        p.send(R.SET_VRING_KICK, vfile(i), [efd()])
        p.send(R.SET_VRING_CALL, vfile(i), [efd()])
        assert is_closed(early_calls[i])                   # replaced call fd closed
    assert p.send(R.GET_STATUS) == pack_reply(R.GET_STATUS, u64(8))
    p.send(R.SET_STATUS, u64(0xf))
    for i in (0, 1):
        cfg = p.ring(i)
        assert cfg.ready and cfg.enabled and cfg.num == 256 and cfg.event_idx
        assert cfg.net_header_size == 12 and cfg.desc_addr == QEMU_RINGS[i][0]
        assert h.of("ring", i)[-1][2] == cfg               # hooks saw the latest config
    p.send(R.SET_STATUS, u64(0))
    assert [c[1] for c in h.of("status")] == [0x8, 0xf, 0x0]
    h.stop_at = {0: 0, 1: 12}
    assert p.send(R.GET_VRING_BASE, state(0)) == pack_reply(R.GET_VRING_BASE, state(0, 0))
    assert p.send(R.GET_VRING_BASE, state(1)) == pack_reply(R.GET_VRING_BASE, state(1, 12))
    assert h.of("stop") == [("stop", 0), ("stop", 1)]
    for i in (0, 1):
        cfg = p.ring(i)
        assert not cfg.started and cfg.kick_fd == -1 and cfg.call_fd >= 0
        assert h.of("ring", i)[-1][2] == cfg
    n = len(h.calls)
    p.send(R.SET_VRING_ENABLE, state(0, 1))
    p.send(R.SET_VRING_ENABLE, state(1, 1))
    assert len(h.calls) == n                               # nothing changed, nothing told
    owned = p.dev.owned_fds()
    assert len(owned) == 2 + 2 * 2 + 1                     # regions, call+err per ring, backend req
    p.close()
    assert h.calls[-1] == ("reset",) and all(is_closed(fd) for fd in owned)


def test_qemu_with_configure_mem_slots(peer):
    p, h = peer, peer.hooks
    p.negotiate(protocol=SUPPORTED_PROTOCOL_FEATURES)
    assert p.send(R.GET_MAX_MEM_SLOTS) == pack_reply(R.GET_MAX_MEM_SLOTS, u64(8))
    fds = [memfd(), memfd()]
    for r, fd in zip(QEMU_REGIONS, fds):
        assert p.send(R.ADD_MEM_REG, single(*r), [fd], need_reply=True) == ack(R.ADD_MEM_REG)
    assert h.of("mem")[-1] == ("mem", list(QEMU_REGIONS))
    # Overlapping the first region: refused, fd closed, table unchanged.
    bad = memfd()
    assert p.send(R.ADD_MEM_REG, single(0x1000, 0x1000, 0x1000, 0), [bad], need_reply=True) == \
        ack(R.ADD_MEM_REG, 1)
    assert is_closed(bad) and len(p.dev.regions) == 2
    # REM_MEM_REG: matched on gpa/size/uva; a stray fd is closed unused.
    stray = efd()
    r0 = QEMU_REGIONS[0]
    assert p.send(R.REM_MEM_REG, single(r0[0], r0[1], r0[2], 0x5555), [stray],
                  need_reply=True) == ack(R.REM_MEM_REG)
    assert is_closed(stray) and is_closed(fds[0]) and not is_closed(fds[1])
    assert h.of("mem")[-1] == ("mem", [QEMU_REGIONS[1]])
    assert p.send(R.REM_MEM_REG, single(*r0), need_reply=True) == ack(R.REM_MEM_REG, 1)


def test_qemu_7_2_multiqueue_repeats_add_mem_reg_per_queue_pair(peer):
    """QEMU 7.2 with queues=2: each queue pair's vhost device sends the whole
    table on the shared connection, so every region comes twice (QEMU 8.0
    sends it once). The repeat is accepted without remapping, its fd closed;
    REM_MEM_REG comes as often and only the last one unmaps."""
    p, h = peer, peer.hooks
    p.negotiate(protocol=SUPPORTED_PROTOCOL_FEATURES)
    r0 = QEMU_REGIONS[0]
    first, again = memfd(), memfd()
    assert p.send(R.ADD_MEM_REG, single(*r0), [first], need_reply=True) == ack(R.ADD_MEM_REG)
    maps = len(h.of("mem"))
    assert p.send(R.ADD_MEM_REG, single(*r0), [again], need_reply=True) == ack(R.ADD_MEM_REG)
    assert is_closed(again) and not is_closed(first)
    assert len(h.of("mem")) == maps and len(p.dev.regions) == 1
    # Same gpa, other offset: not a repeat, an overlap.
    other = memfd()
    assert p.send(R.ADD_MEM_REG, single(r0[0], r0[1], r0[2], 0x1000), [other],
                  need_reply=True) == ack(R.ADD_MEM_REG, 1)
    assert is_closed(other)
    assert p.send(R.REM_MEM_REG, single(*r0), need_reply=True) == ack(R.REM_MEM_REG)
    assert not is_closed(first) and len(p.dev.regions) == 1
    assert p.send(R.REM_MEM_REG, single(*r0), need_reply=True) == ack(R.REM_MEM_REG)
    assert is_closed(first) and p.dev.regions == []
    assert p.send(R.REM_MEM_REG, single(*r0), need_reply=True) == ack(R.REM_MEM_REG, 1)
    # SET_MEM_TABLE replaces everything, repeat counts included.
    p.send(R.ADD_MEM_REG, single(*r0), [memfd()], need_reply=True)
    p.send(R.ADD_MEM_REG, single(*r0), [memfd()], need_reply=True)
    p.send(R.SET_MEM_TABLE, table(r0), [memfd()])
    assert p.send(R.REM_MEM_REG, single(*r0), need_reply=True) == ack(R.REM_MEM_REG)
    assert p.dev.regions == []


DPDK_REGION = (0x100200000, 0x200000, 0x100200000, 0)
DPDK_RINGS = {0: 0x1003a4000, 2: 0x100391000, 1: 0x10039f000, 3: 0x10038c000}


def test_dpdk_22_11_virtio_user_2q(peer):
    p, h = peer, peer.hooks
    p.send(R.SET_OWNER)
    p.send(R.GET_FEATURES)
    p.send(R.GET_PROTOCOL_FEATURES)
    p.send(R.SET_PROTOCOL_FEATURES, u64(0x10009))          # MQ, REPLY_ACK, STATUS
    for i in (0, 2, 1, 3):
        p.send(R.SET_VRING_CALL, vfile(i), [efd()])
    p.send(R.SET_FEATURES, u64(0x950448000 & SUPPORTED_FEATURES))
    assert p.dev.acked_features == mask(VF.VERSION_1, VF.PROTOCOL_FEATURES, VF.INDIRECT_DESC,
                                        VF.MQ, VF.MRG_RXBUF, VF.IN_ORDER)
    assert p.send(R.SET_STATUS, u64(0xb), need_reply=True) == ack(R.SET_STATUS)
    assert p.send(R.GET_STATUS) == pack_reply(R.GET_STATUS, u64(0xb))
    assert p.send(R.GET_STATUS) == pack_reply(R.GET_STATUS, u64(0xb))
    mem = memfd()
    assert p.send(R.SET_MEM_TABLE, table(DPDK_REGION), [mem], need_reply=True) == \
        ack(R.SET_MEM_TABLE)
    for i, desc in DPDK_RINGS.items():
        p.send(R.SET_VRING_NUM, state(i, 256))
        p.send(R.SET_VRING_BASE, state(i, 0))
        p.send(R.SET_VRING_ADDR, VringAddr(i, 0, desc, desc + 0x2000, desc + 0x1000, 0).pack())
        p.send(R.SET_VRING_KICK, vfile(i), [efd()])
        assert p.ring(i).ready and not p.ring(i).enabled
    for i in (0, 1):
        p.send(R.SET_VRING_ENABLE, state(i, 1))
    p.send(R.SET_STATUS, u64(0xf), need_reply=True)
    for size in (0x800000, 0xe00000, 0x1200000, 0x17200000):
        for i in (0, 1):
            p.send(R.SET_VRING_ENABLE, state(i, 0))
        n_ring = len(h.of("ring"))
        new = memfd()
        assert p.send(R.SET_MEM_TABLE, table((0x100200000, size, 0x100200000, 0)), [new],
                      need_reply=True) == ack(R.SET_MEM_TABLE)
        assert is_closed(mem) and not is_closed(new)       # old table's fd went
        assert len(h.of("ring")) == n_ring                 # rings still map: no ring change
        mem = new
        for i in (0, 1):
            p.send(R.SET_VRING_ENABLE, state(i, 1))
    for i in (2, 3):
        p.send(R.SET_VRING_ENABLE, state(i, 1))
    for i in (0, 1, 2, 3):
        p.send(R.SET_VRING_ENABLE, state(i, 0))
    assert len(h.of("mem")) == 5
    h.stop_at = {0: 0, 1: 35104, 2: 0, 3: 35168}
    for i in (0, 1, 2, 3):
        assert p.send(R.GET_VRING_BASE, state(i)) == \
            pack_reply(R.GET_VRING_BASE, state(i, h.stop_at[i]))
        assert not p.ring(i).started
    # A second GET_VRING_BASE on a stopped ring: no worker asked, same answer.
    assert p.send(R.GET_VRING_BASE, state(1)) == pack_reply(R.GET_VRING_BASE, state(1, 35104))
    assert len(h.of("stop")) == 4


def test_vapp_legacy(peer):
    p = peer
    p.send(R.SET_OWNER)
    assert p.send(R.GET_FEATURES) == pack_reply(R.GET_FEATURES, u64(SUPPORTED_FEATURES))
    p.send(R.SET_MEM_TABLE, table((0, 0x1000000, 0x10000000, 0)), [memfd()])
    for i in (0, 1):
        setup_ring(p, i)
        cfg = p.ring(i)
        assert cfg.started and cfg.enabled and cfg.ready
        assert cfg.features == 0 and cfg.net_header_size == 10
    assert p.dev.legacy and not p.ring(2).enabled


def test_set_features_without_protocol_bit_enables_all_rings(peer):
    peer.send(R.SET_FEATURES, u64(1 << VF.VERSION_1))
    assert all(peer.ring(i).enabled for i in range(16))


def test_rings_start_disabled_with_protocol_features(acked):
    setup_ring(acked, 0)
    assert acked.ring(0).started and not acked.ring(0).enabled
    acked.send(R.SET_VRING_ENABLE, state(0, 1))
    assert acked.ring(0).enabled


def test_kick_without_fd_means_polling(acked):
    setup_ring(acked, 0, kick=False)
    acked.send(R.SET_VRING_KICK, vfile(0, nofd=True))
    cfg = acked.ring(0)
    assert cfg.started and cfg.polling and cfg.kick_fd == -1


def test_reset_owner_closes_everything_but_keeps_protocol(acked):
    setup_ring(acked, 0)
    owned = acked.dev.owned_fds()
    assert acked.send(R.RESET_OWNER, need_reply=True) == ack(R.RESET_OWNER)
    assert all(is_closed(fd) for fd in owned) and not acked.dev.owned_fds()
    assert acked.hooks.calls[-1] == ("reset",)
    assert acked.dev.acked_protocol_features == SUPPORTED_PROTOCOL_FEATURES
    assert acked.dev.acked_features == 0 and acked.ring(0) == RingConfig(0)


# -- REPLY_ACK ------------------------------------------------------------------------

def test_need_reply_without_reply_ack_gets_nothing(peer):
    peer.negotiate(protocol=1 << PF.MQ)
    assert peer.send(R.SET_VRING_NUM, state(0, 256), need_reply=True) == b""
    assert peer.send(R.SET_VRING_NUM, state(0, 3), need_reply=True) == b""


def test_reply_ack(acked):
    assert acked.send(R.SET_VRING_NUM, state(0, 256), need_reply=True) == ack(R.SET_VRING_NUM)
    assert acked.send(R.SET_VRING_NUM, state(0, 255), need_reply=True) == ack(R.SET_VRING_NUM, 1)
    assert acked.send(R.SET_VRING_NUM, state(0, 128)) == b""          # not asked
    # A request that replies anyway replies once.
    assert acked.send(R.GET_FEATURES, need_reply=True) == \
        pack_reply(R.GET_FEATURES, u64(SUPPORTED_FEATURES))
    assert acked.send(99, need_reply=True) == pack_reply(99, u64(1))  # unknown request
    assert acked.send(99) == b""


# -- malformed and hostile messages -----------------------------------------------------

def fixed_size_requests():
    for code, row in TABLE.items():
        if not hasattr(NetBackend, row.handler) or row.payload is MemoryTable:
            continue
        yield R(code)


@pytest.mark.parametrize("request_", list(fixed_size_requests()), ids=lambda r: r.name)
def test_wrong_size_for_each_fixed_size_message(acked, request_):
    row = TABLE[request_]
    setup_ring(acked, 0)
    size = 0 if row.payload is None else row.payload.SIZE
    payload = b"\0" * (size + 1)
    fds = [efd() for _ in range(row.fds[0] or (1 if row.fds[1] else 0))]
    before = (acked.dev.acked_features, [acked.ring(i) for i in range(4)], acked.dev.status)
    n = len(acked.hooks.calls)
    out = acked.raw(request_, payload, fds, need_reply=True)
    if row.reply:
        assert out.close and "wrong size" in out.close
    else:
        assert out.close is None and out.reply == ack(request_, 1)
    assert all(is_closed(fd) for fd in fds)
    assert (acked.dev.acked_features, [acked.ring(i) for i in range(4)], acked.dev.status) == before
    assert len(acked.hooks.calls) == n


def test_wrong_fd_counts(acked):
    a, b = efd(), efd()
    assert acked.send(R.SET_VRING_CALL, vfile(0), [a, b], need_reply=True) == \
        ack(R.SET_VRING_CALL, 1)
    assert is_closed(a) and is_closed(b)
    a = efd()
    assert acked.send(R.SET_OWNER, fds=[a], need_reply=True) == ack(R.SET_OWNER, 1)
    assert is_closed(a)
    a = efd()
    assert acked.send(R.SET_VRING_KICK, vfile(0, nofd=True), [a], need_reply=True) == \
        ack(R.SET_VRING_KICK, 1)
    assert is_closed(a) and not acked.ring(0).started
    assert acked.send(R.SET_VRING_KICK, vfile(0), need_reply=True) == ack(R.SET_VRING_KICK, 1)
    assert acked.send(R.SET_BACKEND_REQ_FD, need_reply=True) == ack(R.SET_BACKEND_REQ_FD, 1)
    a = memfd()
    assert acked.send(R.SET_MEM_TABLE, table((0, 0x1000, 0, 0), (0x1000, 0x1000, 0x1000, 0)),
                      [a], need_reply=True) == ack(R.SET_MEM_TABLE, 1)
    assert is_closed(a)
    out = acked.raw(R.GET_FEATURES, fds=[efd()])               # replying request: connection goes
    assert out.close


def test_bad_ring_index(acked):
    for req, payload in ((R.SET_VRING_NUM, state(16, 256)), (R.SET_VRING_BASE, state(99, 0)),
                         (R.SET_VRING_ENABLE, state(16, 1)),
                         (R.SET_VRING_ADDR, VringAddr(16, 0, 0x10000000, 0x10002000,
                                                      0x10001000, 0).pack())):
        assert acked.send(req, payload, need_reply=True) == ack(req, 1)
    fd = efd()
    assert acked.send(R.SET_VRING_KICK, vfile(255), [fd], need_reply=True) == \
        ack(R.SET_VRING_KICK, 1)
    assert is_closed(fd)
    assert acked.raw(R.GET_VRING_BASE, state(16)).close


def test_small_device_has_fewer_rings():
    p = Peer(max_queue_pairs=1)
    assert p.send(R.SET_VRING_NUM, state(2, 256)) == b""       # refused, logged
    assert p.dev.rings[1].num == 0 and len(p.dev.rings) == 2
    p.close()


def test_more_queue_pairs_than_offered_refuse_the_whole_setup(caplog):
    """DPDK virtio-user queues=4 against a port that offers 2: its first
    message for ring 4 is refused with one warning, and so is every later
    request that changes state (quietly): the acknowledged SET_STATUS fails,
    which is where DPDK gives up. Nothing starts; GET_* are still answered."""
    p = Peer(max_queue_pairs=2)
    p.negotiate(features=mask(VF.VERSION_1, VF.PROTOCOL_FEATURES))
    caplog.set_level("DEBUG", logger="vhu.protocol")
    for ring in (0, 2, 4, 6, 1, 3, 5, 7):                      # DPDK's order
        p.send(R.SET_VRING_CALL, vfile(ring), [efd()])
    assert p.send(R.SET_STATUS, u64(0xb), need_reply=True) == ack(R.SET_STATUS, 1)
    assert p.send(R.SET_MEM_TABLE, table((0, 0x1000000, 0x10000000, 0)), [memfd()],
                  need_reply=True) == ack(R.SET_MEM_TABLE, 1)
    for ring in range(4):
        setup_ring(p, ring)
    assert p.send(R.GET_STATUS) == pack_reply(R.GET_STATUS, u64(0))
    assert p.send(R.GET_QUEUE_NUM) == pack_reply(R.GET_QUEUE_NUM, u64(2))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["SET_VRING_CALL refused: ring index 4 out of range (0..3): queue pair 2 "
                        "asked for, 2 offered (vhu.master --queues); the front-end's set-up is "
                        "refused: give it at most 2 queue pairs, or offer more"], warnings
    assert not p.dev.regions and not any(r.started or r.num for r in p.dev.rings)
    assert p.dev.rings[0].call >= 0          # what came before the refusal stands
    # RESET_OWNER starts over: a set-up within the offer is served.
    p.send(R.RESET_OWNER)
    assert p.dev.refused is None
    p.send(R.SET_MEM_TABLE, table((0, 0x1000000, 0x10000000, 0)), [memfd()])
    setup_ring(p, 3)
    assert p.ring(3).ready
    p.close()


def test_front_end_that_only_asked_the_queue_count():
    """QEMU with more queues= than offered asks GET_QUEUE_NUM and leaves; the
    port layer tells that apart from a front-end that set something up."""
    p = Peer(max_queue_pairs=2)
    p.negotiate(features=mask(VF.VERSION_1, VF.PROTOCOL_FEATURES))
    assert not p.dev.only_asked_queue_num
    assert p.send(R.GET_QUEUE_NUM) == pack_reply(R.GET_QUEUE_NUM, u64(2))
    assert p.dev.only_asked_queue_num
    p.send(R.SET_OWNER)
    for ring in (0, 1):                      # what QEMU 7.2 sends before it gives up
        p.send(R.SET_VRING_CALL, vfile(ring), [efd()])
        p.send(R.SET_VRING_ERR, vfile(ring), [efd()])
    assert p.dev.only_asked_queue_num
    p.send(R.SET_VRING_NUM, state(0, 256))
    assert not p.dev.only_asked_queue_num
    p.close()


@pytest.mark.parametrize("offset,accepted,note", [
    (0, True, None),
    (8, True, "descriptor table at 0x10000008 is 8- but not 16-byte aligned"),
    (4, False, None),
])
def test_descriptor_table_alignment_as_linux_vhost(acked, caplog, offset, accepted, note):
    """vhu.ring_layout: descriptors need 8 (their u64 loads), the spec's 16 is
    not required (Vapp's table is at +8); one INFO line per ring says so."""
    caplog.set_level("INFO", logger="vhu.protocol")
    acked.send(R.SET_VRING_NUM, state(0, 256))
    desc = 0x10000000 + offset
    payload = VringAddr(0, 0, desc, 0x10002000, 0x10001002, 0).pack()
    assert acked.send(R.SET_VRING_ADDR, payload, need_reply=True) == \
        ack(R.SET_VRING_ADDR, 0 if accepted else 1)
    assert acked.dev.rings[0].addr_set == accepted
    infos = [r.getMessage() for r in caplog.records
             if r.levelname == "INFO" and "out-of-spec" in r.getMessage()]
    assert infos == ([f"ring 0: out-of-spec layout, served anyway: {note}"] if note else [])


@pytest.mark.parametrize("num", [0, 3, 255, 65536, 1 << 31, 0xFFFFFFFF])
def test_bad_vring_num(acked, num):
    assert acked.send(R.SET_VRING_NUM, state(0, num), need_reply=True) == ack(R.SET_VRING_NUM, 1)
    assert acked.ring(0).num == 0


def test_vring_num_limits_and_started_ring(acked):
    assert acked.send(R.SET_VRING_NUM, state(0, 32768), need_reply=True) == ack(R.SET_VRING_NUM)
    assert acked.send(R.SET_VRING_NUM, state(0, 1), need_reply=True) == ack(R.SET_VRING_NUM)
    setup_ring(acked, 1)
    assert acked.send(R.SET_VRING_NUM, state(1, 128), need_reply=True) == ack(R.SET_VRING_NUM, 1)
    assert acked.send(R.SET_VRING_BASE, state(1, 5), need_reply=True) == ack(R.SET_VRING_BASE, 1)
    assert acked.send(R.SET_VRING_BASE, state(0, 0x10000), need_reply=True) == \
        ack(R.SET_VRING_BASE, 1)


@pytest.mark.parametrize("desc,avail,used,flags", [
    (0x10000004, 0x10001000, 0x10002000, 0),       # descriptor table not 8-aligned
    (0x10000000, 0x10001001, 0x10002000, 0),       # avail not 2-aligned
    (0x10000000, 0x10001000, 0x10002002, 0),       # used not 4-aligned
    (0x10000000, 0x10001000, 0x10002000, 2),       # a flag other than VRING_F_LOG
    (0x0, 0x10001000, 0x10002000, 0),              # outside the table
    (0x10fff800, 0x10001000, 0x10002000, 0),       # runs past the region's end
    (0x10000000, 0x10001000, 0xfffffffffffffff0, 0),
])
def test_bad_vring_addr(acked, desc, avail, used, flags):
    acked.send(R.SET_VRING_NUM, state(0, 256))
    payload = VringAddr(0, flags, desc, used, avail, 0).pack()
    assert acked.send(R.SET_VRING_ADDR, payload, need_reply=True) == ack(R.SET_VRING_ADDR, 1)
    assert not acked.dev.rings[0].addr_set


BAD_TABLES = {
    "overlapping gpa": ((0, 0x2000, 0x10000, 0), (0x1000, 0x1000, 0x20000, 0)),
    "overlapping uva": ((0, 0x1000, 0x10000, 0), (0x1000, 0x1000, 0x10000, 0)),
    "size 0": ((0, 0, 0x10000, 0),),
    "gpa wraps": ((0xfffffffffffff000, 0x2000, 0x10000, 0),),
    "uva wraps": ((0, 0x2000, 0xfffffffffffff000, 0),),
    "offset wraps": ((0, 0x2000, 0x10000, 0xfffffffffffff000),),
}


@pytest.mark.parametrize("name", list(BAD_TABLES))
def test_bad_memory_table(acked, name):
    regions = BAD_TABLES[name]
    fds = [memfd() for _ in regions]
    before = list(acked.dev.regions)
    assert acked.send(R.SET_MEM_TABLE, table(*regions), fds, need_reply=True) == \
        ack(R.SET_MEM_TABLE, 1)
    assert all(is_closed(fd) for fd in fds) and acked.dev.regions == before
    with pytest.raises(ProtocolError):
        validate_regions([r for r in regions])


def test_memory_table_region_count(acked):
    nine = struct.pack("=II", 9, 0) + b"".join(
        MemoryRegion(i << 20, 0x1000, i << 20, 0).pack() for i in range(9))
    fds = [memfd() for _ in range(8)]
    assert acked.send(R.SET_MEM_TABLE, nine, fds, need_reply=True) == ack(R.SET_MEM_TABLE, 1)
    zero = struct.pack("=II", 0, 0) + MemoryRegion(0, 0x1000, 0, 0).pack()
    fds += [memfd()]
    assert acked.send(R.SET_MEM_TABLE, zero, fds[-1:], need_reply=True) == ack(R.SET_MEM_TABLE, 1)
    assert all(is_closed(fd) for fd in fds)
    eight = [(i << 20, 0x1000, i << 20, 0) for i in range(8)]
    assert acked.send(R.SET_MEM_TABLE, table(*eight), [memfd() for _ in range(8)],
                      need_reply=True) == ack(R.SET_MEM_TABLE)
    assert len(acked.dev.regions) == 8


def test_add_mem_reg_respects_max_slots():
    p = Peer(max_mem_slots=2)
    p.negotiate()
    for i in range(2):
        assert p.send(R.ADD_MEM_REG, single(i << 20, 0x1000, i << 20), [memfd()],
                      need_reply=True) == ack(R.ADD_MEM_REG)
    fd = memfd()
    assert p.send(R.ADD_MEM_REG, single(5 << 20, 0x1000, 5 << 20), [fd],
                  need_reply=True) == ack(R.ADD_MEM_REG, 1)
    assert is_closed(fd)
    p.close()


def test_hooks_may_refuse_a_memory_table(acked):
    acked.hooks.refuse_memory = "fd is not a memory file"
    fd = efd()
    before = list(acked.dev.regions)
    assert acked.send(R.SET_MEM_TABLE, table((0, 0x1000, 0, 0)), [fd], need_reply=True) == \
        ack(R.SET_MEM_TABLE, 1)
    assert is_closed(fd) and acked.dev.regions == before


def test_unknown_request_and_bad_flags(acked):
    fd = efd()
    assert acked.send(200, b"junk", [fd], need_reply=True) == pack_reply(200, u64(1))
    assert is_closed(fd)
    assert acked.send(R.SET_OWNER, flags=0x4, need_reply=True) == ack(R.SET_OWNER, 1)
    assert acked.send(R.SET_OWNER, flags=0x100, need_reply=True) == ack(R.SET_OWNER, 1)
    # Known, but without the fd it must carry.
    assert acked.send(R.SET_LOG_FD, need_reply=True) == ack(R.SET_LOG_FD, 1)
    assert acked.raw(R.GET_CONFIG, b"\0" * 12).close


def test_a_flood_of_bad_messages_is_refused_every_time_but_warned_of_only_at_first(acked, caplog):
    """Each bad message still gets its failure reply; the log gets the first
    REFUSALS_WARNED of them, one line saying the rest go to DEBUG, no more."""
    from vhu.protocol.dispatch import REFUSALS_WARNED
    caplog.set_level(logging.WARNING, logger="vhu.protocol.dispatch")
    for _ in range(1000):
        assert acked.send(R.SET_OWNER, flags=0x100, need_reply=True) == ack(R.SET_OWNER, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == REFUSALS_WARNED + 1, warnings[-3:]
    assert warnings[0].startswith("SET_OWNER refused: reserved header flags set")
    assert "further refusals are logged at DEBUG" in warnings[-1]
    assert acked.send(R.GET_FEATURES)                      # the connection goes on


def test_net_set_mtu(acked):
    """QEMU host_mtu=N: NET_MTU offered, the MTU kept; nonsense refused."""
    assert SUPPORTED_FEATURES & (1 << VF.NET_MTU)
    assert acked.send(R.NET_SET_MTU, u64(9000), need_reply=True) == ack(R.NET_SET_MTU)
    assert acked.dev.mtu == 9000
    for bad in (0, 67, 65536, 1 << 40):
        assert acked.send(R.NET_SET_MTU, u64(bad), need_reply=True) == ack(R.NET_SET_MTU, 1)
    assert acked.dev.mtu == 9000
    p = Peer()
    p.negotiate(protocol=mask(PF.MQ, PF.REPLY_ACK))       # MTU not negotiated: refused
    assert p.send(R.NET_SET_MTU, u64(1500), need_reply=True) == ack(R.NET_SET_MTU, 1)
    p.close()


def test_unoffered_feature_bits_are_refused(peer):
    peer.negotiate(protocol=mask(PF.MQ, PF.REPLY_ACK))
    assert peer.send(R.SET_FEATURES, u64(1 << VF.NOTIFICATION_DATA), need_reply=True) == \
        ack(R.SET_FEATURES, 1)
    assert peer.dev.acked_features == 0
    assert peer.send(R.SET_PROTOCOL_FEATURES, u64(1 << PF.PAGEFAULT), need_reply=True) == \
        ack(R.SET_PROTOCOL_FEATURES, 1)
    assert peer.dev.acked_protocol_features == mask(PF.MQ, PF.REPLY_ACK)
    # A protocol feature not negotiated: its requests are refused.
    assert peer.send(R.SET_STATUS, u64(1), need_reply=True) == ack(R.SET_STATUS, 1)
    assert peer.raw(R.GET_STATUS).close
    p = Peer(features=mask(VF.VERSION_1, VF.PROTOCOL_FEATURES))
    p.negotiate()
    assert p.send(R.SET_FEATURES, u64(1 << VF.MQ), need_reply=True) == ack(R.SET_FEATURES, 1)
    p.close()
    legacy = Peer(features=1 << VF.VERSION_1)
    assert legacy.raw(R.GET_PROTOCOL_FEATURES).close
    legacy.close()


def test_features_frozen_while_rings_run(acked):
    setup_ring(acked, 0)
    assert acked.send(R.SET_FEATURES, u64(1 << VF.VERSION_1), need_reply=True) == \
        ack(R.SET_FEATURES, 1)
    assert acked.send(R.SET_FEATURES, u64(acked.dev.acked_features), need_reply=True) == \
        ack(R.SET_FEATURES)


def test_wrong_header_version_closes_connection(acked):
    fd = efd()
    out = acked.disp.receive(HEADER.pack(R.SET_VRING_CALL, 0x2, 8) + vfile(0), [fd])
    assert out.close and "version" in out.close and out.reply == b""
    assert is_closed(fd)


def test_messages_after_a_fatal_one_are_not_handled(acked):
    data = pack_request(R.GET_VRING_BASE, state(40)) + pack_request(R.SET_VRING_NUM, state(0, 256))
    out = acked.disp.receive(data, [])
    assert out.close and acked.ring(0).num == 0
    fd = efd()
    out = acked.disp.receive(pack_request(R.GET_FEATURES), [fd])  # takes no fds: refused
    assert is_closed(fd) and out.close


def test_hook_failure_closes_only_this_connection(acked):
    acked.hooks.fail_ring = "worker died"
    out = acked.raw(R.SET_VRING_CALL, vfile(0), [efd()])
    assert out.close and "internal error" in out.close


def test_transitions_only(acked):
    h = acked.hooks
    setup_ring(acked, 0)
    n = len(h.of("ring", 0))
    acked.send(R.SET_VRING_ENABLE, state(0, 1))
    acked.send(R.SET_VRING_ENABLE, state(0, 1))
    acked.send(R.SET_STATUS, u64(0xf))
    acked.send(R.SET_STATUS, u64(0xf))
    assert len(h.of("ring", 0)) == n + 1 and h.of("status") == [("status", 0xf)]
    old = acked.ring(0).call_fd
    acked.send(R.SET_VRING_CALL, vfile(0), [efd()])        # the recorder fstat()s the new one
    assert is_closed(old) and h.of("ring", 0)[-1][2].call_fd != old
    assert not h.of("ring", 5)


# -- anything at all --------------------------------------------------------------------

_small = st.integers(min_value=0, max_value=20)
_u32 = st.integers(min_value=0, max_value=0xFFFFFFFF)
_u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
_addr = st.one_of(st.integers(0x10000000, 0x11000000), _u64)
_payloads = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda i, n: VringState(i, n).pack(), _small, st.one_of(_small, _u32)),
    st.builds(lambda i, f, d, u, a: VringAddr(i, f, d, u, a, 0).pack(),
              _small, st.sampled_from([0, 1]), _addr, _addr, _addr),
    st.builds(lambda v: u64(v), st.one_of(_small, st.integers(0, 0x1FF), _u64)),
    st.builds(lambda g, n, u, o: single(g, n, u, o), _u64, _u64, _addr, _u64),
    st.builds(lambda rs: table(*rs), st.lists(st.tuples(_u64, _u64, _addr, _u64),
                                              min_size=1, max_size=8)),
)
_messages = st.lists(st.tuples(
    st.one_of(st.sampled_from(list(R)), st.integers(0, 60)),
    st.sampled_from([0, FLAG_NEED_REPLY, 0x4, 0x100]),
    _payloads, st.integers(0, 3)), max_size=25)


@settings(max_examples=300, deadline=None)
@given(_messages)
def test_any_message_sequence_is_survived_without_leaks(messages):
    before = fds_open()
    p = Peer()
    p.negotiate(features=SUPPORTED_FEATURES)
    p.send(R.SET_MEM_TABLE, table((0, 0x1000000, 0x10000000, 0)), [memfd()])
    for request, flags, payload, nfds in messages:
        out = p.disp.receive(pack_request(request, payload, flags=flags),
                             [efd() for _ in range(nfds)])
        for reply in MessageReader().feed(out.reply):
            assert reply.request == request and reply.flags == 0x5
            assert len(reply.payload) == 8
        for cfg in (p.ring(i) for i in range(p.dev.nrings)):
            # Split rings are a power of two; packed rings any size up to 32768.
            assert cfg.num in (0,) or cfg.num & (cfg.num - 1) == 0 or cfg.packed
            assert cfg.num <= 32768
            assert not cfg.mapped or cfg.ready or not cfg.started
        if out.close:
            break
    p.close()
    assert fds_open() == before


# -- packed rings (VIRTIO_F_RING_PACKED) -------------------------------------------

@pytest.fixture
def packed(peer):
    """A peer that negotiated packed rings, with one 16 MiB region at uva 0x10000000."""
    assert SUPPORTED_FEATURES & (1 << VF.RING_PACKED)
    peer.negotiate(features=SUPPORTED_FEATURES)
    peer.send(R.SET_MEM_TABLE, table((0, 0x1000000, 0x10000000, 0)), [memfd()])
    return peer


def test_packed_ring_any_size_and_small_event_areas(packed):
    assert packed.send(R.SET_VRING_NUM, state(0, 255), need_reply=True) == ack(R.SET_VRING_NUM)
    # Driver and device event areas are 4 bytes, 4-byte aligned: the last 4
    # bytes of the region hold one; a split avail ring there would not fit.
    end = 0x10000000 + 0x1000000
    addr = VringAddr(0, 0, 0x10000000, end - 8, end - 4, 0).pack()
    assert packed.send(R.SET_VRING_ADDR, addr, need_reply=True) == ack(R.SET_VRING_ADDR)
    odd = VringAddr(0, 0, 0x10000000, end - 6, end - 4, 0).pack()
    assert packed.send(R.SET_VRING_ADDR, odd, need_reply=True) == ack(R.SET_VRING_ADDR, 1)
    assert packed.send(R.SET_VRING_NUM, state(1, 0), need_reply=True) == ack(R.SET_VRING_NUM, 1)
    assert packed.send(R.SET_VRING_NUM, state(1, 32769), need_reply=True) == \
        ack(R.SET_VRING_NUM, 1)


def test_packed_vring_base_carries_wrap_counters(packed):
    """Bits 0-14 avail position, 15 its wrap counter, 16-31 the used ones; the
    reply carries both halves (QEMU restores the used index from bits 16-31)."""
    setup_ring(packed, 0, num=255)
    base = 200 | 1 << 15
    packed.send(R.GET_VRING_BASE, state(0, 0))         # stop; ring is not started by a worker
    assert packed.send(R.SET_VRING_BASE, state(0, base | base << 16), need_reply=True) == \
        ack(R.SET_VRING_BASE)
    assert packed.ring(0).base == base
    reply = packed.send(R.GET_VRING_BASE, state(0, 0))
    assert reply == pack_reply(R.GET_VRING_BASE, state(0, base | base << 16))
    # A DPDK-style low half only is accepted too; positions past the ring are not.
    assert packed.send(R.SET_VRING_BASE, state(0, 7), need_reply=True) == ack(R.SET_VRING_BASE)
    assert packed.send(R.SET_VRING_BASE, state(0, 255), need_reply=True) == \
        ack(R.SET_VRING_BASE, 1)
    assert packed.send(R.SET_VRING_BASE, state(0, 7 | 300 << 16), need_reply=True) == \
        ack(R.SET_VRING_BASE, 1)


def test_send_rarp(acked):
    """SEND_RARP: the guest's MAC (first 6 payload bytes) handed to the I/O side."""
    seen = []
    acked.dev.hooks.send_rarp = seen.append
    assert acked.send(R.SEND_RARP, u64(0xccbbaa005452), need_reply=True) == ack(R.SEND_RARP)
    assert seen == [bytes.fromhex("525400aabbcc")]
    for bad in (0, 0x01, 0xccbbaa005453):          # zero, multicast (group bit) addresses
        assert acked.send(R.SEND_RARP, u64(bad), need_reply=True) == ack(R.SEND_RARP, 1)
    assert len(seen) == 1


# -- rules a later message could otherwise slip past ----------------------------


def test_ring_size_checked_again_when_packed_is_switched_off(peer):
    """A size any packed ring may have (100) is set while RING_PACKED is
    negotiated; a later SET_FEATURES without it would leave a split ring
    whose size is not a power of two: refused, features unchanged."""
    packed = SUPPORTED_FEATURES
    peer.negotiate(features=packed)
    assert peer.send(R.SET_VRING_NUM, state(1, 100), need_reply=True) == ack(R.SET_VRING_NUM)
    out = peer.send(R.SET_FEATURES, u64(packed & ~(1 << VF.RING_PACKED)), need_reply=True)
    assert out == ack(R.SET_FEATURES, 1)
    assert peer.dev.acked_features == packed


@pytest.mark.parametrize("region", [
    (0, 0x1000, 0x10000, 2**64 - 0x1000),           # mmap_offset + size == 2**64
    (2**64 - 0x1000, 0x1000, 0x10000, 0),           # guest_phys_addr + size == 2**64
])
def test_region_ending_at_2_to_the_64_is_refused(peer, region):
    peer.negotiate()
    fd = os.memfd_create("t")
    os.ftruncate(fd, 0x1000)
    out = peer.send(R.SET_MEM_TABLE, table(region), [fd], need_reply=True)
    assert out == ack(R.SET_MEM_TABLE, 1)
    assert peer.hooks.of("mem") == []


class EventfdOnly(Recorder):
    """What vhu.ports checks: the I/O side refuses an fd that is not an eventfd."""

    def check_eventfd(self, fd):
        if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventfd]":
            raise ValueError("fd is not an eventfd")


@pytest.mark.parametrize("request_", [R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR])
def test_ring_fd_that_is_not_an_eventfd_is_refused_and_closed(request_):
    p = Peer()
    p.hooks = p.dev.hooks = EventfdOnly()
    p.negotiate()
    r, w = os.pipe()
    out = p.send(request_, vfile(1), [w], need_reply=True)
    assert out == ack(request_, 1)
    assert not p.ring(1).started and p.ring(1).kick_fd < 0 and p.ring(1).call_fd < 0
    assert not p.dev.owned_fds()
    with pytest.raises(OSError):
        os.fstat(w)                  # the refused fd was closed, not kept
    assert p.send(request_, vfile(1), [efd()], need_reply=True) == ack(request_)
    p.close()
    os.close(r)
