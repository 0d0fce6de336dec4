"""Packed virtqueues (virtio 1.1, 2.8): driver side against device side, and
the hostile-driver rules. The compiled ring only (the reference ring is split)."""
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.guestmem import make_guest
from vhu import _ring
from vhu._ring import DeviceRing, DriverRing, RingError

VERSION_1, MRG_RXBUF = 1 << 32, 1 << 15
F_AVAIL, F_USED, F_NEXT, F_WRITE, F_INDIRECT = 1 << 7, 1 << 15, 1, 2, 4
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def rings(g, size, event_idx=False, features=VERSION_1 | MRG_RXBUF, start=None, indirect=True,
          device_reads=False):
    desc = g.alloc(16 * size, align=16)
    drv_area = g.alloc(4, align=4)
    dev_area = g.alloc(4, align=4)
    drv = DriverRing(g.driver_mem, size, desc, drv_area, dev_area, event_idx=event_idx,
                     packed=True, start_idx=start)
    dev = DeviceRing(g.device_mem, size, desc, drv_area, dev_area, addr_space="gpa",
                     event_idx=event_idx, features=features, packed=True, indirect=indirect,
                     device_reads=device_reads)
    if start is not None:
        dev.last_avail_idx = start
    return drv, dev, desc, drv_area, dev_area


def alloc_maybe_crossing(g, n):
    """A buffer across the region boundary while one is left, else a plain one."""
    if n >= 2 and g.can_cross(n):
        try:
            return g.alloc(n, align=1, cross=True)
        except MemoryError:
            pass
    return g.alloc(n)


chain_shape = st.tuples(st.lists(st.integers(1, 300), min_size=0, max_size=3),
                        st.lists(st.integers(1, 300), min_size=0, max_size=2),
                        st.booleans()).filter(lambda t: t[0] or t[1])


@SETTINGS
@given(size=st.sampled_from([1, 2, 3, 8, 100, 256, 1024, 32768]),
       batches=st.lists(st.lists(chain_shape, min_size=1, max_size=6), min_size=1, max_size=12),
       event_idx=st.booleans(), start_pos=st.integers(0, 32767), start_wrap=st.integers(0, 1))
def test_chains_roundtrip_across_wraps(size, batches, event_idx, start_pos, start_wrap):
    """Every byte a driver puts in comes out unchanged; written bytes come back;
    positions and wrap counters stay in step across many laps."""
    with make_guest(size=16 << 20, regions=2) as g:
        start = (start_pos % size) | (start_wrap << 15)
        drv, dev, *_ = rings(g, size, event_idx, start=start)
        for batch in batches:
            expect = {}
            for reads, writes, indirect in batch:
                ndesc = 1 if indirect else len(reads) + len(writes)
                if ndesc > drv.free_count or (indirect and len(reads) + len(writes) > size):
                    continue
                rbufs, data = [], b""
                for n in reads:
                    gpa = alloc_maybe_crossing(g, n)
                    chunk = bytes((gpa + i) & 0xFF for i in range(n))
                    g.write(gpa, chunk)
                    rbufs.append((gpa, n))
                    data += chunk
                wbufs = [(g.alloc(n), n) for n in writes]
                table = g.alloc(16 * (len(reads) + len(writes)), align=16) if indirect else None
                head = drv.add(rbufs, wbufs, indirect_gpa=table)
                expect[head] = (data, wbufs)
            drv.publish()
            chains = dev.pop(size)
            assert sorted(c.head for c in chains) == sorted(expect)
            for c in chains:
                data, wbufs = expect[c.head]
                assert b"".join(bytes(v) for v in c.readable) == data
                assert c.write_len == sum(n for _, n in wbufs)
                pattern = bytes((c.head + i) & 0xFF for i in range(c.write_len))
                off = 0
                for v in c.writable:
                    v[:] = pattern[off:off + len(v)]
                    off += len(v)
                dev.push(c.head, c.write_len)
            dev.publish()
            used = drv.get_used()
            assert sorted(h for h, _ in used) == sorted(expect)
            for head, length in used:
                data, wbufs = expect[head]
                assert length == sum(n for _, n in wbufs)
                got = b"".join(g.read(gpa, n) for gpa, n in wbufs)
                assert got == bytes((head + i) & 0xFF for i in range(length))
            assert not dev.broken
        assert dev.last_avail_idx == dev.used_idx       # GET_VRING_BASE after a drain


@pytest.mark.parametrize("mergeable", [False, True])
@pytest.mark.parametrize("rx_size", [2048, 600])
def test_net_frames_through_packed_rings(mergeable, rx_size):
    features = VERSION_1 | (MRG_RXBUF if mergeable else 0)
    with make_guest(size=16 << 20) as g:
        drv, dev, *_ = rings(g, 64, features=features)
        bufs = {}
        for _ in range(64):
            gpa = g.alloc(rx_size)
            bufs[drv.add([], [(gpa, rx_size)])] = gpa
        drv.publish()
        frames = [bytes([i]) * (60 + 97 * i) for i in range(12)]
        fit = [f for f in frames if mergeable or len(f) + 12 <= rx_size]
        delivered = dev.rx_frames(frames if mergeable else fit)
        assert delivered == len(fit)
        dev.publish()
        used = drv.get_used()
        got, i = [], 0
        while i < len(used):
            first = g.read(bufs[used[i][0]], used[i][1])
            nbufs = struct.unpack_from("<H", first, 10)[0]
            data = first[12:] + b"".join(g.read(bufs[h], n) for h, n in used[i + 1:i + nbufs])
            got.append(data)
            i += nbufs
        assert got == fit


def test_rx_without_room_rewinds_and_leaves_ring_untouched():
    """A mergeable frame that runs out of buffers halfway is undone: the
    descriptors it had taken are still the driver's, unchanged."""
    with make_guest() as g:
        drv, dev, desc, *_ = rings(g, 8)
        for _ in range(2):
            drv.add([], [(g.alloc(256), 256)])
        drv.publish()
        before = g.read(desc, 16 * 8)
        assert dev.rx_frames([b"z" * 1000]) == 0
        assert dev.publish() is False
        assert g.read(desc, 16 * 8) == before
        assert dev.stats["rx_no_room"] == 1 and dev.stats["popped"] == 0
        assert dev.rx_frames([b"a" * 100]) == 1          # the buffers are still usable
        dev.publish()
        assert len(drv.get_used()) == 1


def test_event_suppression_both_ways():
    with make_guest() as g:
        drv, dev, desc, drv_area, dev_area = rings(g, 16, event_idx=True)
        dev.disable_notifications()
        assert struct.unpack("<HH", g.read(dev_area, 4))[1] == 1    # DISABLE
        drv.add([(g.alloc(64), 64)])
        assert drv.publish() is False                                # no kick wanted
        assert dev.enable_notifications() is True                   # re-check sees it
        assert struct.unpack("<HH", g.read(dev_area, 4))[1] == 0    # ENABLE
        drv.add([(g.alloc(64), 64)])
        assert drv.publish() is True
        chains = dev.pop(8)
        for c in chains:
            dev.push(c.head, 0)
        assert dev.publish() is True          # ENABLE (the driver's initial state)
        assert len(drv.get_used()) == 2
        drv.disable_interrupts()
        drv.add([(g.alloc(64), 64)])
        drv.publish()
        dev.push(dev.pop(1)[0].head, 0)
        assert dev.publish() is False         # DISABLE
        # Descriptor event: interrupt when the used position passes off/wrap.
        drv.get_used()
        g.write(drv_area, struct.pack("<HH", 4 | (1 << 15), 2))   # DESC at position 4, lap 1
        for expect in (False, True, False):   # positions 3->4 (not yet), 4->5 (passes 4), 5->6
            drv.add([(g.alloc(64), 64)])
            drv.publish()
            dev.push(dev.pop(1)[0].head, 0)
            assert dev.publish() is expect
            drv.get_used()


def test_vring_base_carries_the_wrap_counter():
    with make_guest() as g:
        drv, dev, *_ = rings(g, 4, start=0x8000 | 3)
        assert dev.last_avail_idx == 0x8003
        for _ in range(3):
            drv.add([(g.alloc(8), 8)])
            drv.publish()
            dev.push(dev.pop(1)[0].head, 0)
            dev.publish()
            drv.get_used()
        assert dev.last_avail_idx == 0x0002                 # position 2, wrapped to lap 0
        with pytest.raises(RingError):
            dev.last_avail_idx = 7                          # position past the ring


def test_queue_sizes():
    with make_guest() as g:
        rings(g, 3)                                          # packed: any size 1..32768
        for bad in (0, 32769):
            with pytest.raises(RingError):
                rings(g, bad)


# -- hostile drivers ------------------------------------------------------------

def put_desc(g, desc, pos, addr, length, buf_id, flags):
    g.write(desc + 16 * pos, struct.pack("<QIHH", addr, length, buf_id, flags))


AV = F_AVAIL                       # available in lap 1 (the first)


@pytest.mark.parametrize("case", ["bad_id", "chain_not_available", "chain_too_long",
                                  "indirect_in_chain", "indirect_bad_len", "indirect_empty",
                                  "indirect_nested", "indirect_unmapped", "buffer_unmapped",
                                  "readable_after_writable", "indirect_not_negotiated"])
def test_hostile_packed_driver_breaks_only_its_ring(case):
    with make_guest() as g:
        drv, dev, desc, *_ = rings(g, 4, indirect=case != "indirect_not_negotiated")
        other_drv, other_dev, *_ = rings(g, 4)
        buf, table = g.alloc(64), g.alloc(64, align=16)
        reason = {
            "bad_id": _ring.BROKEN_BAD_ID,
            "chain_not_available": _ring.BROKEN_CHAIN_NOT_AVAILABLE,
            "chain_too_long": _ring.BROKEN_CHAIN_TOO_LONG,
            "indirect_in_chain": _ring.BROKEN_INDIRECT_IN_CHAIN,
            "indirect_bad_len": _ring.BROKEN_INDIRECT_BAD_LEN,
            "indirect_empty": _ring.BROKEN_INDIRECT_BAD_LEN,
            "indirect_nested": _ring.BROKEN_INDIRECT_NESTED,
            "indirect_unmapped": _ring.BROKEN_INDIRECT_UNMAPPED,
            "buffer_unmapped": _ring.BROKEN_BUFFER_UNMAPPED,
            "readable_after_writable": _ring.BROKEN_READABLE_AFTER_WRITABLE,
            "indirect_not_negotiated": _ring.BROKEN_INDIRECT_NOT_NEGOTIATED,
        }[case]
        if case == "bad_id":
            put_desc(g, desc, 0, buf, 64, 4, AV)
        elif case == "chain_not_available":
            put_desc(g, desc, 1, buf, 64, 0, 0)                    # never made available
            put_desc(g, desc, 0, buf, 64, 0, AV | F_NEXT)
        elif case == "chain_too_long":
            for pos in range(4):                                   # NEXT on every slot: loops the ring
                put_desc(g, desc, pos, buf, 8, 0, AV | F_NEXT)
            # (a fifth descriptor would be position 0 of lap 0: not available -> the
            # walk stops on length first because the lap flips)
            reason = (_ring.BROKEN_CHAIN_TOO_LONG, _ring.BROKEN_CHAIN_NOT_AVAILABLE)
        elif case == "indirect_in_chain":
            put_desc(g, desc, 1, table, 16, 0, AV | F_INDIRECT)
            put_desc(g, desc, 0, buf, 64, 0, AV | F_NEXT)
        elif case == "indirect_bad_len":
            put_desc(g, desc, 0, table, 24, 0, AV | F_INDIRECT)
        elif case == "indirect_empty":
            put_desc(g, desc, 0, table, 0, 0, AV | F_INDIRECT)
        elif case == "indirect_nested":
            g.write(table, struct.pack("<QIHH", buf, 64, 0, F_INDIRECT))
            put_desc(g, desc, 0, table, 16, 0, AV | F_INDIRECT)
        elif case == "indirect_unmapped":
            put_desc(g, desc, 0, g.unmapped_gpa(), 16, 0, AV | F_INDIRECT)
        elif case == "buffer_unmapped":
            put_desc(g, desc, 0, g.unmapped_gpa(), 64, 0, AV)
        elif case == "readable_after_writable":
            put_desc(g, desc, 1, buf, 8, 0, AV)
            put_desc(g, desc, 0, buf, 8, 0, AV | F_WRITE | F_NEXT)
        elif case == "indirect_not_negotiated":
            put_desc(g, desc, 0, table, 16, 0, AV | F_INDIRECT)
        before = g.snapshot()
        assert dev.pop(4) == []
        assert dev.broken
        reasons = reason if isinstance(reason, tuple) else (reason,)
        assert dev.broken_reason in reasons
        key = "broken_" + next(n for n in dir(_ring) if n.startswith("BROKEN_")
                               and getattr(_ring, n) == dev.broken_reason)[7:].lower()
        assert dev.stats[key] == 1
        assert g.changed_ranges(before) == []              # nothing written anywhere
        assert dev.pop(4) == [] and dev.publish() is False  # stays stopped
        # Another ring on the same memory is unaffected.
        other_drv.add([(buf, 64)])
        other_drv.publish()
        assert [c.read_len for c in other_dev.pop(4)] == [64]


@pytest.mark.parametrize("device_reads", [True, False], ids=["transmitq", "receiveq"])
def test_dpdk_packed_tx_indirect_table_with_a_writable_header_entry(device_reads):
    """DPDK's virtio PMD (22.11, virtqueue.h vring_desc_init_indirect_packed)
    sets WRITE on every entry of each packed TX indirect table at start, then
    overwrites the data entries' flags (NEXT and its avail/used bits) when it
    sends a multi-segment mbuf: the header entry stays WRITE. On a transmit
    queue the device reads every buffer and takes that chain whole, header
    first; on a receive queue the same table is a readable buffer after a
    writable one, and breaks the ring."""
    with make_guest() as g:
        drv, dev, desc, *_ = rings(g, 4, device_reads=device_reads)
        hdr, seg1, seg2, table = g.alloc(12), g.alloc(700), g.alloc(300), g.alloc(48, align=16)
        g.write(hdr, b"h" * 12)
        g.write(seg1, b"a" * 700)
        g.write(seg2, b"b" * 300)
        g.write(table, struct.pack("<QIHH", hdr, 12, 0, F_WRITE)
                + struct.pack("<QIHH", seg1, 700, 1, AV | F_NEXT)
                + struct.pack("<QIHH", seg2, 300, 2, AV))
        put_desc(g, desc, 0, table, 48, 0, AV | F_INDIRECT)
        chains = dev.pop(4)
        if not device_reads:
            assert chains == [] and dev.broken_reason == _ring.BROKEN_READABLE_AFTER_WRITABLE
            return
        assert not dev.broken
        (c,) = chains
        assert (c.read_len, c.write_len) == (12 + 700 + 300, 0)
        assert b"".join(bytes(v) for v in c.readable) == b"h" * 12 + b"a" * 700 + b"b" * 300


# -- a hostile device (the driver side: vhu.frontend) -----------------------------

@pytest.mark.parametrize("in_order", [False, True])
@pytest.mark.parametrize("case", ["id_not_in_flight", "used_without_avail_bit"])
def test_hostile_device_is_an_error_on_the_driver_side(case, in_order):
    """A used descriptor naming a buffer id not in flight, or a flag pattern
    no device writes (USED flipped, AVAIL not): RingError, nothing freed."""
    with make_guest() as g:
        desc = g.alloc(16 * 4, align=16)
        drv = DriverRing(g.driver_mem, 4, desc, g.alloc(4, align=4), g.alloc(4, align=4),
                         packed=True, in_order=in_order)
        buf = g.alloc(64)
        head = drv.add([], [(buf, 64)])
        drv.publish()
        free = drv.free_count
        if case == "id_not_in_flight":
            put_desc(g, desc, 0, buf, 64, head + 1, F_AVAIL | F_USED | F_WRITE)
        else:
            put_desc(g, desc, 0, buf, 64, head, F_USED | F_WRITE)      # lap 1: AVAIL must be set too
        with pytest.raises(RingError):
            drv.get_used()
        assert drv.free_count == free
