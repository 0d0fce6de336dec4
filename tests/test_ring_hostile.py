"""A hostile driver: rings crafted byte by byte in guest memory.

For each rule the device must enforce (vhu/_ring.pyi, BROKEN_*): pop hands
out nothing and raises nothing, the ring is broken with that reason and
its counter is 1, nothing anywhere in guest memory changed, and another
ring on the same memory keeps working. Every test runs against the
reference ring (vhu.refring) and the compiled one (vhu._ring).
"""
import os
import struct
import subprocess
import sys
import textwrap

import pytest

from tests.guestmem import make_guest, ring_addresses
from vhu import refring

try:
    from vhu import _ring as compiled
except ImportError:      # not built yet
    compiled = None

needs_compiled = pytest.mark.skipif(compiled is None, reason="vhu._ring is not built")
IMPLS = [pytest.param(refring, id="ref"),
         pytest.param(compiled, id="compiled", marks=needs_compiled)]
impls = pytest.mark.parametrize("impl", IMPLS)

NEXT, WRITE, INDIRECT = 1, 2, 4
HOLE = 0x10000
# How the device meets the bad chain: every entry point must stop the same way.
ENTRY_POINTS = pytest.mark.parametrize("entry", ["pop", "tx_frames", "rx_frames"])


def stats_key(reason):
    for name in dir(refring):
        if name.startswith("BROKEN_") and getattr(refring, name) == reason:
            return "broken_" + name[len("BROKEN_"):].lower()
    raise KeyError(reason)


class Hostile:
    """A victim ring the test writes raw, and a control ring driven properly,
    on one guest of three regions separated by unmapped holes."""

    def __init__(self, impl, size=8, indirect=True, start=0, hole=HOLE):
        self.impl = impl
        self.size = size
        self.guest = g = make_guest(size=3 << 20, regions=3, hole=hole)
        self.desc, self.avail, self.used = ring_addresses(g, size)
        self.victim = impl.DeviceRing(g.device_mem, size, g.uva(self.desc), g.uva(self.avail),
                                      g.uva(self.used), indirect=indirect, features=1 << 32)
        self.victim.last_avail_idx = start
        self.avail_idx = start
        g.put_u16(self.avail + 2, start)
        g.put_u16(self.used + 2, start)
        # A well-formed buffer and a scratch area for indirect tables.
        self.buf = g.alloc(256)
        g.write(self.buf, bytes(range(256)))
        self.table = g.alloc(16 * (size + 4), align=16)
        # The control ring: same memory, same implementation, driven properly.
        cd, ca, cu = ring_addresses(g, 8)
        self.ctl_drv = refring.DriverRing(g.driver_mem, 8, cd, ca, cu)
        self.ctl_dev = impl.DeviceRing(g.device_mem, 8, g.uva(cd), g.uva(ca), g.uva(cu),
                                       features=1 << 32)
        self.ctl_buf = g.alloc(128)

    def close(self):
        self.guest.close()

    # -- crafting ----------------------------------------------------------------

    def desc_at(self, table_gpa, i, addr, length, flags=0, nxt=0):
        struct.pack_into("<QIHH", self.guest.view(table_gpa + 16 * i, 16), 0,
                         addr, length, flags, nxt)

    def put_desc(self, i, addr, length, flags=0, nxt=0):
        self.desc_at(self.desc, i, addr, length, flags, nxt)

    def offer(self, *heads):
        """Make heads available: avail ring entries, then avail->idx."""
        for h in heads:
            self.guest.put_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), h)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.guest.put_u16(self.avail + 2, self.avail_idx)

    # -- checking ----------------------------------------------------------------

    def meet(self, entry):
        ring = self.victim
        if entry == "pop":
            return ring.pop(16)
        if entry == "tx_frames":
            return ring.tx_frames(16)
        if entry == "rx_frames":
            return ring.rx_frames([b"\x00" * 60])
        raise ValueError(entry)

    def assert_broken(self, reason, entry="pop"):
        ring = self.victim
        before = self.guest.snapshot()
        stats_before = ring.stats
        got = self.meet(entry)
        assert not got, f"{entry} handed out {got!r}"
        assert ring.broken
        assert ring.broken_reason == reason
        key = stats_key(reason)
        assert ring.stats[key] == 1
        # It stays stopped and does not count again.
        assert ring.pop(16) == []
        assert ring.avail_count() == 0
        assert ring.enable_notifications() is False
        assert ring.stats[key] == 1
        assert ring.stats["popped"] == stats_before["popped"]
        # The device wrote nothing: no used entries, no flags, no buffers.
        ring.publish()
        assert self.guest.changed_ranges(before) == []
        self.assert_control_works()

    def assert_control_works(self):
        g = self.guest
        g.write(self.ctl_buf, b"control!" * 8)
        head = self.ctl_drv.add([(self.ctl_buf, 64)], [(self.ctl_buf + 64, 64)])
        self.ctl_drv.publish()
        chains = self.ctl_dev.pop(4)
        assert [c.head for c in chains] == [head]
        assert b"".join(bytes(v) for v in chains[0].readable) == b"control!" * 8
        chains[0].writable[0][:5] = b"reply"
        self.ctl_dev.push(head, 5)
        self.ctl_dev.publish()
        assert self.ctl_drv.get_used() == [(head, 5)]
        assert g.read(self.ctl_buf + 64, 5) == b"reply"
        assert not self.ctl_dev.broken


@pytest.fixture
def hostile_factory():
    rigs = []

    def make(impl, **kw):
        rig = Hostile(impl, **kw)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


# -- one test per hostile rule -----------------------------------------------------------

@impls
@ENTRY_POINTS
@pytest.mark.parametrize("bad_head", ["size", "0xffff"])
def test_head_out_of_range(impl, entry, bad_head, hostile_factory):
    h = hostile_factory(impl)
    h.put_desc(0, h.buf, 64)
    h.offer(h.size if bad_head == "size" else 0xFFFF)
    h.assert_broken(impl.BROKEN_HEAD_OUT_OF_RANGE, entry)


@impls
@ENTRY_POINTS
def test_next_out_of_range(impl, entry, hostile_factory):
    h = hostile_factory(impl)
    h.put_desc(0, h.buf, 64, NEXT, h.size)
    h.offer(0)
    h.assert_broken(impl.BROKEN_NEXT_OUT_OF_RANGE, entry)


@impls
@ENTRY_POINTS
@pytest.mark.parametrize("shape", ["self_loop", "two_loop", "loop_after_writable"])
def test_chain_loop(impl, entry, shape, hostile_factory):
    h = hostile_factory(impl)
    if shape == "self_loop":
        h.put_desc(3, h.buf, 16, NEXT, 3)
        h.offer(3)
    elif shape == "two_loop":
        h.put_desc(0, h.buf, 16, NEXT, 1)
        h.put_desc(1, h.buf + 16, 16, NEXT, 0)
        h.offer(0)
    else:
        h.put_desc(0, h.buf, 16, WRITE | NEXT, 1)
        h.put_desc(1, h.buf + 16, 16, WRITE | NEXT, 0)
        h.offer(0)
    h.assert_broken(impl.BROKEN_CHAIN_TOO_LONG, entry)


@impls
@ENTRY_POINTS
@pytest.mark.parametrize("shape", ["longer_than_queue", "loop_in_table", "direct_plus_table"])
def test_indirect_chain_too_long(impl, entry, shape, hostile_factory):
    h = hostile_factory(impl)
    n = h.size + 1
    if shape == "longer_than_queue":
        # A straight table of size + 1 entries: longer than the queue.
        for i in range(n):
            h.desc_at(h.table, i, h.buf, 8, NEXT if i + 1 < n else 0, i + 1 if i + 1 < n else 0)
        h.put_desc(0, h.table, 16 * n, INDIRECT)
    elif shape == "loop_in_table":
        h.desc_at(h.table, 0, h.buf, 8, NEXT, 1)
        h.desc_at(h.table, 1, h.buf, 8, NEXT, 0)
        h.put_desc(0, h.table, 32, INDIRECT)
    else:
        # size - 1 direct descriptors, then a table of 2: size + 1 buffers.
        for i in range(h.size - 1):
            h.put_desc(i, h.buf, 8, NEXT, i + 1)
        h.put_desc(h.size - 1, h.table, 32, INDIRECT)
        h.desc_at(h.table, 0, h.buf, 8, NEXT, 1)
        h.desc_at(h.table, 1, h.buf, 8, 0, 0)
    h.offer(0)
    h.assert_broken(impl.BROKEN_CHAIN_TOO_LONG, entry)


@impls
@ENTRY_POINTS
@pytest.mark.parametrize("length", [0, 8, 24, 17])
def test_indirect_bad_len(impl, entry, length, hostile_factory):
    h = hostile_factory(impl)
    h.desc_at(h.table, 0, h.buf, 8)
    h.desc_at(h.table, 1, h.buf, 8)
    h.put_desc(0, h.table, length, INDIRECT)
    h.offer(0)
    h.assert_broken(impl.BROKEN_INDIRECT_BAD_LEN, entry)


@impls
@ENTRY_POINTS
def test_indirect_nested(impl, entry, hostile_factory):
    h = hostile_factory(impl)
    inner = h.table + 64
    h.desc_at(inner, 0, h.buf, 8)
    h.desc_at(h.table, 0, h.buf, 8, NEXT, 1)
    h.desc_at(h.table, 1, inner, 16, INDIRECT)
    h.put_desc(0, h.table, 32, INDIRECT)
    h.offer(0)
    h.assert_broken(impl.BROKEN_INDIRECT_NESTED, entry)


@impls
@ENTRY_POINTS
@pytest.mark.parametrize("where", ["hole", "past_end", "straddles_end", "wraps_2_64"])
def test_indirect_unmapped(impl, entry, where, hostile_factory):
    h = hostile_factory(impl)
    g = h.guest
    addr = {"hole": g.unmapped_gpa(), "past_end": g.end + 0x1000,
            "straddles_end": g.end - 16, "wraps_2_64": 2**64 - 16}[where]
    h.put_desc(0, addr, 32, INDIRECT)
    h.offer(0)
    h.assert_broken(impl.BROKEN_INDIRECT_UNMAPPED, entry)


@impls
@ENTRY_POINTS
def test_indirect_not_negotiated(impl, entry, hostile_factory):
    h = hostile_factory(impl, indirect=False)
    h.desc_at(h.table, 0, h.buf, 8)
    h.put_desc(0, h.table, 16, INDIRECT)
    h.offer(0)
    h.assert_broken(impl.BROKEN_INDIRECT_NOT_NEGOTIATED, entry)


@impls
@ENTRY_POINTS
@pytest.mark.parametrize("where", ["hole", "past_end", "straddles_hole", "straddles_end",
                                   "wraps_2_64", "huge_len", "in_indirect", "second_in_chain"])
def test_buffer_unmapped(impl, entry, where, hostile_factory):
    h = hostile_factory(impl)
    g = h.guest
    first = g.regions[0]
    bad = {"hole": (g.unmapped_gpa(), 64),
           "past_end": (g.end + 0x1000, 64),
           "straddles_hole": (first.end - 32, 64),     # the next region starts HOLE later
           "straddles_end": (g.end - 32, 64),
           "wraps_2_64": (2**64 - 32, 64),
           "huge_len": (h.buf, 0xFFFFFFFF),
           "in_indirect": (g.unmapped_gpa(), 64),
           "second_in_chain": (g.unmapped_gpa(), 64)}[where]
    if where == "in_indirect":
        h.desc_at(h.table, 0, h.buf, 8, NEXT, 1)
        h.desc_at(h.table, 1, *bad, WRITE)
        h.put_desc(0, h.table, 32, INDIRECT)
    elif where == "second_in_chain":
        h.put_desc(0, h.buf, 8, NEXT, 5)
        h.put_desc(5, *bad, WRITE)
    else:
        h.put_desc(0, *bad)
    h.offer(0)
    h.assert_broken(impl.BROKEN_BUFFER_UNMAPPED, entry)


@impls
@ENTRY_POINTS
@pytest.mark.parametrize("start", [0, 0xFFFC])
def test_avail_idx_jump(impl, entry, start, hostile_factory):
    h = hostile_factory(impl, start=start)
    for i in range(h.size):
        h.put_desc(i, h.buf, 8)
    h.offer(*range(h.size))
    # One more than the queue can hold, published in one go (16-bit wrap for 0xFFFC).
    h.avail_idx = (start + h.size + 1) & 0xFFFF
    g = h.guest
    g.put_u16(h.avail + 2, h.avail_idx)
    h.assert_broken(impl.BROKEN_AVAIL_IDX_JUMP, entry)


@impls
def test_avail_idx_jump_seen_by_avail_count(impl, hostile_factory):
    h = hostile_factory(impl)
    h.guest.put_u16(h.avail + 2, h.size + 1)
    before = h.guest.snapshot()
    assert h.victim.avail_count() == 0
    assert h.victim.broken_reason == impl.BROKEN_AVAIL_IDX_JUMP
    assert h.victim.stats["broken_avail_idx_jump"] == 1
    assert h.guest.changed_ranges(before) == []
    h.assert_control_works()


@impls
@ENTRY_POINTS
@pytest.mark.parametrize("shape", ["direct", "in_indirect", "direct_writable_then_table"])
def test_readable_after_writable(impl, entry, shape, hostile_factory):
    h = hostile_factory(impl)
    if shape == "direct":
        h.put_desc(0, h.buf, 8, NEXT, 1)
        h.put_desc(1, h.buf + 8, 8, WRITE | NEXT, 2)
        h.put_desc(2, h.buf + 16, 8)
    elif shape == "in_indirect":
        h.desc_at(h.table, 0, h.buf, 8, WRITE | NEXT, 1)
        h.desc_at(h.table, 1, h.buf + 8, 8)
        h.put_desc(0, h.table, 32, INDIRECT)
    else:
        h.put_desc(0, h.buf, 8, WRITE | NEXT, 1)
        h.put_desc(1, h.table, 16, INDIRECT)
        h.desc_at(h.table, 0, h.buf + 8, 8)
    h.offer(0)
    h.assert_broken(impl.BROKEN_READABLE_AFTER_WRITABLE, entry)


@impls
def test_bad_chain_in_a_batch_hands_out_nothing(impl, hostile_factory):
    h = hostile_factory(impl)
    h.put_desc(0, h.buf, 8)
    h.put_desc(1, h.buf, 8, NEXT, h.size)
    h.offer(0, 1)
    h.assert_broken(impl.BROKEN_NEXT_OUT_OF_RANGE)
    assert h.victim.last_avail_idx == 0


@impls
def test_broken_ring_stays_broken_after_the_guest_repairs_it(impl, hostile_factory):
    h = hostile_factory(impl)
    h.put_desc(0, h.buf, 8, NEXT, h.size)
    h.offer(0)
    h.assert_broken(impl.BROKEN_NEXT_OUT_OF_RANGE)
    h.put_desc(0, h.buf, 8)
    assert h.victim.pop(4) == []
    assert h.victim.broken_reason == impl.BROKEN_NEXT_OUT_OF_RANGE


# -- legal chains a defensive device must not reject ---------------------------------------

@impls
@pytest.mark.parametrize("size", [1, 2, 4, 256])
def test_indirect_table_of_queue_size_entries_is_legal(impl, size, hostile_factory):
    """virtio 1.x 2.7.5.3.1 limits a chain to the queue size; a table of
    exactly `size` entries is within it (Linux builds such tables)."""
    h = hostile_factory(impl, size=size)
    for i in range(size):
        last = i + 1 == size
        h.desc_at(h.table, i, h.buf + i % 256, 1, 0 if last else NEXT, 0 if last else i + 1)
    h.put_desc(0, h.table, 16 * size, INDIRECT)
    h.offer(0)
    chains = h.victim.pop(4)
    assert not h.victim.broken, h.victim.broken_reason
    assert len(chains) == 1 and chains[0].read_len == size


@impls
@pytest.mark.parametrize("size", [2, 8])
def test_direct_chain_of_queue_size_descriptors_is_legal(impl, size, hostile_factory):
    h = hostile_factory(impl, size=size)
    for i in range(size):
        last = i + 1 == size
        h.put_desc(i, h.buf + i, 1, 0 if last else NEXT, 0 if last else i + 1)
    h.offer(0)
    chains = h.victim.pop(4)
    assert not h.victim.broken, h.victim.broken_reason
    assert chains[0].read_len == size


@impls
def test_indirect_table_crossing_a_region_boundary_is_legal(impl):
    """Tables, like buffers, may straddle two regions adjacent in gpa."""
    g = make_guest(size=1 << 20, regions=2, hole=0)
    try:
        d, a, u = ring_addresses(g, 4)
        buf = g.alloc(64)
        g.write(buf, b"x" * 64)
        table = g.boundaries()[0] - 16          # entry 0 in region 0, entry 1 in region 1
        drv = refring.DriverRing(g.driver_mem, 4, d, a, u)
        dev = impl.DeviceRing(g.device_mem, 4, d, a, u, addr_space="gpa")
        head = drv.add([(buf, 32)], [(buf + 32, 32)], indirect_gpa=table)
        drv.publish()
        chains = dev.pop(4)
        assert not dev.broken, dev.broken_reason
        assert [c.head for c in chains] == [head]
        assert (chains[0].read_len, chains[0].write_len) == (32, 32)
    finally:
        g.close()


@impls
@pytest.mark.parametrize("extra_flags", [WRITE, NEXT, WRITE | NEXT])
def test_write_and_next_on_the_indirect_descriptor_are_ignored(impl, extra_flags, hostile_factory):
    """2.7.5.3.2: the device MUST ignore the write-only flag of a descriptor
    that refers to an indirect table; NEXT there is a driver error that
    Linux vhost and DPDK ignore too (the chain ends with the table)."""
    h = hostile_factory(impl)
    h.desc_at(h.table, 0, h.buf, 8, NEXT, 1)
    h.desc_at(h.table, 1, h.buf + 8, 8, WRITE)
    h.put_desc(0, h.table, 32, INDIRECT | extra_flags, h.size + 3)   # next out of range: unused
    h.offer(0)
    chains = h.victim.pop(4)
    assert not h.victim.broken, h.victim.broken_reason
    assert (chains[0].read_len, chains[0].write_len) == (8, 8)


@impls
def test_zero_length_descriptors_are_skipped(impl, hostile_factory):
    h = hostile_factory(impl)
    h.put_desc(0, h.guest.unmapped_gpa(), 0, NEXT, 1)   # never accessed: not checked
    h.put_desc(1, h.buf, 4, NEXT, 2)
    h.put_desc(2, h.buf, 0, WRITE)
    h.offer(0)
    chains = h.victim.pop(4)
    assert not h.victim.broken, h.victim.broken_reason
    c = chains[0]
    assert (c.read_len, c.write_len, len(c.readable), len(c.writable)) == (4, 0, 1, 0)


@impls
def test_chain_with_65536_segments_keeps_them_all(impl):
    """32768 descriptors, each crossing a region boundary: 65536 segments.
    Every one must be in the Chain, and tx_frames must return exactly the
    guest's bytes (a 16-bit segment count would lose them all)."""
    size = 32768
    g = make_guest(size=4 << 20, regions=2, hole=0)
    try:
        d, a, u = ring_addresses(g, size)
        boundary = g.boundaries()[0]
        g.write(boundary - 1, b"\x11\x22")
        view = g.view(d, 16 * size)
        for i in range(size):
            last = i + 1 == size
            struct.pack_into("<QIHH", view, 16 * i, boundary - 1, 2,
                             0 if last else NEXT, 0 if last else i + 1)
        del view
        g.put_u16(a + 4, 0)
        g.put_u16(a + 2, 1)
        dev = impl.DeviceRing(g.device_mem, size, d, a, u, addr_space="gpa")
        chains = dev.pop(1)
        if dev.broken:
            # Refusing the chain is acceptable only with the segment-limit reason.
            assert dev.broken_reason == getattr(impl, "BROKEN_TOO_MANY_SEGMENTS", None)
            return
        c = chains[0]
        assert c.read_len == 2 * size
        assert len(c.readable) == 2 * size
        assert sum(len(v) for v in c.readable) == c.read_len
        del chains, c
        dev.last_avail_idx = 0
        frames = dev.tx_frames(1)
        assert frames == [(b"\x11\x22" * size)[10:]]
    finally:
        g.close()


@impls
def test_rx_writes_only_writable_buffers_and_used_ring(impl):
    """Device writes land only in device-writable buffers and the used ring
    (plus used->flags/avail_event), whatever else the chain holds."""
    g = make_guest(size=1 << 20, regions=2, hole=0)
    try:
        size = 8
        d, a, u = ring_addresses(g, size)
        drv = refring.DriverRing(g.driver_mem, size, d, a, u, event_idx=True)
        dev = impl.DeviceRing(g.device_mem, size, d, a, u, addr_space="gpa", event_idx=True,
                              features=(1 << 32) | (1 << 15))
        ro = g.alloc(100)
        rw = [g.alloc(40, align=1, cross=True), g.alloc(30)]
        rw2 = g.alloc(500)
        drv.add([(ro, 100)], [(rw[0], 40), (rw[1], 30)])
        drv.add([], [(rw2, 500)])
        drv.publish()
        before = g.snapshot()
        assert dev.rx_frames([bytes(range(200))]) == 1
        dev.publish()
        dev.enable_notifications()
        allowed = [(rw[0], 40), (rw[1], 30), (rw2, 500), (u, 6 + 8 * size)]
        for gpa, n in g.changed_ranges(before):
            assert any(s <= gpa and gpa + n <= s + ln for s, ln in allowed), hex(gpa)
    finally:
        g.close()


# -- memory table changes under a live ring -------------------------------------------------

MEMORY_CHANGE_SCRIPT = textwrap.dedent("""
    import os
    from tests.guestmem import make_guest, ring_addresses
    from vhu import {module} as impl
    g = make_guest(size=1 << 20, regions=2)
    d, a, u = ring_addresses(g, 4)
    drv = impl.DriverRing(g.driver_mem, 4, d, a, u)
    dev = impl.DeviceRing(g.device_mem, 4, g.uva(d), g.uva(a), g.uva(u))
    buf = g.alloc(64)
    drv.add([(buf, 64)])
    drv.publish()
    head = dev.pop(1)[0].head
    fd0, gpa, size, uva, off = g.table[0]
    if {case!r} == "remove":
        # REM_MEM_REG of the region holding the ring while a chain is in flight.
        g.device_mem.remove_region(gpa, size, uva)
        assert dev.pop(1) == []
    else:
        # SET_MEM_TABLE: same layout, new files; the old mappings go away.
        fds = [os.memfd_create("new") for _ in g.table]
        for f, r in zip(fds, g.regions):
            os.ftruncate(f, r.mmap_offset + r.size)
        g.device_mem.set_table([(f,) + t[1:] for f, t in zip(fds, g.table)])
    dev.push(head, 0)
    dev.publish()
    dev.disable_notifications()
    dev.enable_notifications()
    print("survived", dev.broken_reason)
""")


@pytest.mark.parametrize("module", [pytest.param("refring", id="ref"),
                                    pytest.param("_ring", id="compiled", marks=needs_compiled)])
@pytest.mark.parametrize("case", ["remove", "set_table"])
def test_completing_chains_after_a_memory_table_change_does_not_crash(module, case):
    """The back-end completes chains it popped before SET_MEM_TABLE/REM_MEM_REG:
    push/publish/notifications must re-translate (or refuse), never touch an
    unmapped old mapping. Run in a child process: the failure mode is SIGSEGV."""
    script = MEMORY_CHANGE_SCRIPT.format(module=module, case=case)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env=env, cwd=root)
    assert proc.returncode == 0, f"child died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    assert "survived" in proc.stdout


# -- construction errors ---------------------------------------------------------------------

@impls
@pytest.mark.parametrize("size", [0, 3, 65536, -1, 32769, 32767, 6])
def test_bad_queue_size(impl, size):
    g = make_guest(size=4 << 20, regions=1)
    try:
        d, a, u = ring_addresses(g, 32768)
        with pytest.raises(impl.RingError):
            impl.check_queue_size(size)
        with pytest.raises(impl.RingError):
            impl.split_ring_layout(size)
        with pytest.raises(impl.RingError):
            impl.DeviceRing(g.device_mem, size, d, a, u, addr_space="gpa")
        with pytest.raises(impl.RingError):
            impl.DriverRing(g.driver_mem, size, d, a, u)
    finally:
        g.close()


@impls
@pytest.mark.parametrize("which", ["desc", "avail", "used"])
@pytest.mark.parametrize("problem", ["unmapped", "straddles_hole", "straddles_boundary",
                                     "misaligned", "gpa_given_as_uva"])
def test_bad_ring_address(impl, which, problem):
    hole = 0 if problem == "straddles_boundary" else HOLE
    g = make_guest(size=1 << 20, regions=2, hole=hole)
    try:
        size = 64
        addrs = dict(zip(["desc", "avail", "used"], ring_addresses(g, size)))
        part_len = {"desc": 16 * size, "avail": 6 + 2 * size, "used": 6 + 8 * size}[which]
        space = "gpa"
        if problem == "unmapped":
            addrs[which] = g.unmapped_gpa() // 16 * 16
        elif problem in ("straddles_hole", "straddles_boundary"):
            addrs[which] = (g.regions[0].end - part_len // 2) // 16 * 16
        elif problem == "misaligned":
            addrs[which] += {"desc": 4, "avail": 1, "used": 2}[which]   # vhu.ring_layout
        else:
            space = "uva"      # the other two are proper uvas, this one is a gpa
            addrs = {k: (v if k == which else g.uva(v)) for k, v in addrs.items()}
        with pytest.raises(impl.RingError):
            impl.DeviceRing(g.device_mem, size, addrs["desc"], addrs["avail"], addrs["used"],
                            addr_space=space)
        if space == "gpa":
            with pytest.raises(impl.RingError):
                impl.DriverRing(g.driver_mem, size, addrs["desc"], addrs["avail"], addrs["used"])
    finally:
        g.close()


@impls
def test_bad_addr_space(impl):
    g = make_guest(size=1 << 20)
    try:
        with pytest.raises(impl.RingError):
            impl.DeviceRing(g.device_mem, 4, *ring_addresses(g, 4), addr_space="hva")
    finally:
        g.close()


@impls
def test_remap_after_the_ring_region_is_removed(impl):
    g = make_guest(size=1 << 20, regions=2)
    try:
        d, a, u = ring_addresses(g, 4)
        dev = impl.DeviceRing(g.device_mem, 4, g.uva(d), g.uva(a), g.uva(u))
        fd0, gpa, size, uva, off = g.table[0]
        g.device_mem.remove_region(gpa, size, uva)
        with pytest.raises(impl.RingError):
            dev.remap()
        assert dev.pop(4) == []
        assert dev.broken
        assert dev.stats["broken_ring_unmapped"] == 1
    finally:
        g.close()


@impls
def test_bad_ring_base(impl, hostile_factory):
    h = hostile_factory(impl)
    for bad in (-1, 0x10000):
        with pytest.raises(impl.RingError):
            h.victim.last_avail_idx = bad
