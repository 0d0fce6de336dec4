"""The batch fast paths of the core, against what a user of the ring checks:
DriverRing.add_slots (drv_add_slots: a front-end refilling fixed buffer
slots), DeviceRing.tx_frames (dev_push_popped: a transmit ring's chains go
back all at once), pop_chains' region cache (buffers that alternate between
regions or cross an edge), and bench_roundtrip's counts. Split, packed and
IN_ORDER rings, each driven across many laps of the ring."""
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.guestmem import make_guest, ring_addresses
from vhu._ring import DeviceRing, DriverRing, RingError, bench_roundtrip

VERSION_1 = 1 << 32
HDR = 12
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def rings(g, size, kind, event_idx=False):
    packed = kind == "packed"
    if packed:
        desc, avail, used = g.alloc(16 * size, align=16), g.alloc(4, align=4), g.alloc(4, align=4)
    else:
        desc, avail, used = ring_addresses(g, size)
    drv = DriverRing(g.driver_mem, size, desc, avail, used, event_idx=event_idx, packed=packed,
                     in_order=kind == "in_order")
    dev = DeviceRing(g.device_mem, size, desc, avail, used, addr_space="gpa",
                     event_idx=event_idx, features=VERSION_1, packed=packed)
    return drv, dev


def frame(slot, n):
    """Slot `slot`'s frame: a header, then bytes that name the slot."""
    return bytes(HDR) + bytes(((slot * 31 + i) & 0xFF) for i in range(n))


@SETTINGS
@given(kind=st.sampled_from(["split", "packed", "in_order"]),
       size=st.sampled_from([1, 2, 8, 64, 256]),
       rounds=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300)), min_size=1, max_size=12),
       event_idx=st.booleans())
def test_add_slots_frames_come_out_of_their_slots(kind, size, rounds, event_idx):
    # Each round: add_slots puts up to `add` chains out (never more than are
    # free), the device takes up to `take` frames with tx_frames, the driver
    # reclaims. Every frame must be the bytes of the slot its used element
    # names, nothing written, and the counts must add up on both sides.
    slot_bytes, length = 128, 100
    with make_guest(size=4 << 20, regions=2) as g:
        drv, dev = rings(g, size, kind, event_idx)
        base = g.alloc(slot_bytes * size)
        for h in range(size):
            g.write(base + h * slot_bytes, frame(h, length - HDR))
        in_flight = added = 0
        for add, take in rounds:
            n = drv.add_slots(base, slot_bytes, length, max_chains=add)
            assert n == min(add, size - in_flight)
            added += n
            in_flight += n
            assert drv.free_count == size - in_flight
            drv.publish()
            frames = dev.tx_frames(take)
            assert len(frames) == min(take, in_flight)
            dev.publish()
            used = drv.get_used()
            assert len(used) == len(frames)
            for (head, written), got in zip(used, frames):
                assert written == 0                      # only read, nothing written
                assert got == frame(head, length - HDR)[HDR:]
            in_flight -= len(used)
            assert drv.free_count == size - in_flight
        stats = dev.stats
        assert not dev.broken
        assert stats["popped"] == stats["pushed"] == stats["tx_frames"] == added - in_flight
        assert stats["tx_bytes"] == stats["tx_frames"] * (length - HDR)


@pytest.mark.parametrize("kind", ["split", "packed", "in_order"])
def test_add_slots_writable_and_checked(kind):
    # Writable slots (a receive ring's refill): the device fills them, the
    # driver reads each back from the slot its head names.
    size, slot_bytes = 16, 256
    with make_guest() as g:
        drv, dev = rings(g, size, kind)
        base = g.alloc(slot_bytes * size)
        assert drv.add_slots(base, slot_bytes, slot_bytes, writable=True) == size
        assert drv.add_slots(base, slot_bytes, slot_bytes, writable=True) == 0   # full
        drv.publish()
        frames = [bytes([k]) * (60 + k) for k in range(size)]
        assert dev.rx_frames(frames) == size
        dev.publish()
        used = drv.get_used()
        assert len(used) == size
        for k, (head, written) in enumerate(used):
            assert written == HDR + len(frames[k])
            assert g.read(base + head * slot_bytes + HDR, len(frames[k])) == frames[k]
        # Slots that do not fit in guest memory are refused before any is added.
        with pytest.raises(RingError):
            drv.add_slots(g.end - slot_bytes, slot_bytes, slot_bytes)
        with pytest.raises(ValueError):
            drv.add_slots(base, slot_bytes, 0)
        assert drv.free_count == size


def test_pop_fast_path_across_regions():
    # Single-descriptor buffers that alternate between regions, and some
    # that cross a region edge, in one batch: the region cache must follow
    # each buffer, and a crossing buffer must come out as two segments.
    size = 64
    rng = random.Random(5)
    with make_guest(size=4 << 20, regions=4) as g:
        drv, dev = rings(g, size, "split")
        bufs = []
        for i in range(size):
            n = rng.randrange(2, 200)
            if i % 7 == 3 and g.can_cross(n):
                gpa = g.alloc(n, align=1, cross=True)
            else:
                # Jump to another region now and then: the bump allocator
                # only moves forward, so skip ahead inside guest memory.
                gpa = g.alloc(n)
            data = bytes(rng.randrange(256) for _ in range(n))
            g.write(gpa, data)
            bufs.append((gpa, data))
            drv.add([(gpa, n)])
        drv.publish()
        chains = dev.pop(size)
        assert len(chains) == size
        crossing = 0
        for c, (gpa, data) in zip(chains, bufs):
            assert b"".join(bytes(v) for v in c.readable) == data
            assert c.read_len == len(data) and c.writable == []
            crossing += len(c.readable) > 1
        assert crossing >= 2


def test_pop_fast_path_alternating_regions():
    # Each buffer in a different region than the one before it.
    size = 32
    with make_guest(size=4 << 20, regions=4) as g:
        drv, dev = rings(g, size, "split")
        per_region = [[r.gpa + 0x10000 + 0x100 * k for k in range(size)] for r in g.regions]
        bufs = []
        for i in range(size):
            gpa = per_region[i % len(per_region)][i]
            data = struct.pack("<I", i) * 16
            g.write(gpa, data)
            bufs.append(data)
            drv.add([(gpa, len(data))])
        drv.publish()
        chains = dev.pop(size)
        assert [b"".join(bytes(v) for v in c.readable) for c in chains] == bufs
        assert all(len(c.readable) == 1 for c in chains)


def test_pop_fast_path_unmapped_buffer_breaks_the_ring():
    # The region cache must not let a buffer past the end of the last hit
    # region through: a buffer that starts inside it and runs past guest
    # memory is outside the regions.
    with make_guest(size=1 << 20, regions=1) as g:
        drv, dev = rings(g, 8, "split")
        ok = g.alloc(64)
        drv.add([(ok, 64)])
        drv.add([(g.end - 16, 64)])        # runs 48 bytes past the end
        drv.publish()
        assert dev.pop(8) == []
        assert dev.broken and dev.stats["broken_buffer_unmapped"] == 1


@pytest.mark.parametrize("kind", ["split", "packed", "in_order"])
@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("size,batch", [(1, 1), (256, 32), (1024, 64), (8, 256)])
def test_bench_roundtrip_counts(kind, event_idx, size, batch):
    # The benchmark moves what it says it moved: the device popped and
    # pushed exactly that many, and every chain is back with the driver.
    with make_guest(size=8 << 20) as g:
        drv, dev = rings(g, size, kind, event_idx)
        base = g.alloc(2048 * size)
        packets = 10_000
        moved = bench_roundtrip(drv, dev, base, 64, packets, batch)
        assert packets <= moved < packets + batch
        stats = dev.stats
        assert stats["popped"] == stats["pushed"] == moved
        assert not dev.broken
        # What is still out is what the device has not popped yet.
        assert size - drv.free_count == dev.avail_count()
        with pytest.raises(ValueError):
            bench_roundtrip(drv, dev, g.end - 32, 64, 10, batch)
