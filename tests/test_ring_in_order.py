"""VIRTIO_F_IN_ORDER (virtio 1.x 2.7.9 split, 2.8.20 packed), driver side:
a device may return a batch with one used entry naming its last chain and
skip the ring forward over the others. The driver must hand every chain of
the batch back, in the order it made them available, and stay in step for
the batches after. The device here is DeviceRing popping, with the used
side written by hand the way a batching device (DPDK's in-order dequeue)
writes it, or element by element as vhu's own device does."""
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.guestmem import make_guest
from vhu._ring import DeviceRing, DriverRing

VERSION_1 = 1 << 32
F_AVAIL, F_USED, F_WRITE = 1 << 7, 1 << 15, 2
SETTINGS = settings(max_examples=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class BatchingDevice:
    """The used side of an in-order device, written into guest memory by hand."""

    def __init__(self, g, packed, size, desc, used):
        self.g, self.packed, self.size, self.desc, self.used = g, packed, size, desc, used
        self.pos, self.wrap = 0, 1        # packed used position / wrap counter
        self.idx = 0                      # split used->idx

    def complete(self, chains, written, batched):
        """chains: [(id, ndesc)] in pop order; written: bytes into the last one."""
        groups = [chains] if batched else [[c] for c in chains]
        for group in groups:
            last_id = group[-1][0]
            length = written if group[-1] is chains[-1] else 0
            if self.packed:
                at = self.desc + 16 * self.pos
                bits = (F_AVAIL | F_USED) if self.wrap else 0
                self.g.write(at + 8, struct.pack("<IH", length, last_id))
                self.g.write(at + 14, struct.pack("<H", bits | (F_WRITE if length else 0)))
                for _, ndesc in group:           # skip forward over the batch
                    self.pos += ndesc
                    if self.pos >= self.size:
                        self.pos -= self.size
                        self.wrap ^= 1
            else:
                slot = self.used + 4 + 8 * (self.idx % self.size)
                self.g.write(slot, struct.pack("<II", last_id, length))
                self.idx = (self.idx + len(group)) & 0xFFFF
                self.g.write(self.used + 2, struct.pack("<H", self.idx))


def make_rings(g, size, packed):
    desc = g.alloc(16 * size, align=16)
    avail = g.alloc(4 if packed else 6 + 2 * size, align=4)
    used = g.alloc(4 if packed else 6 + 8 * size, align=4)
    drv = DriverRing(g.driver_mem, size, desc, avail, used, packed=packed, in_order=True)
    dev = DeviceRing(g.device_mem, size, desc, avail, used, addr_space="gpa",
                     features=VERSION_1, packed=packed)
    return drv, dev, BatchingDevice(g, packed, size, desc, used)


@SETTINGS
@given(packed=st.booleans(), size=st.sampled_from([1, 2, 4, 16, 256]),
       batches=st.lists(st.tuples(st.integers(1, 20), st.booleans(), st.integers(1, 3)),
                        min_size=1, max_size=40))
def test_in_order_batches_come_back_in_order(packed, size, batches):
    g = make_guest()
    drv, dev, device = make_rings(g, size, packed)
    buf = g.alloc(64)
    for count, batched, ndesc in batches:
        ndesc = min(ndesc, size)
        added = []
        while len(added) < count and drv.free_count >= ndesc:
            # A chain of ndesc readable buffers, the last writable: the
            # device writes into the batch's last chain only.
            head = drv.add([(buf, 8)] * (ndesc - 1), [(buf, 64)])
            added.append((head, ndesc))
        drv.publish()
        popped = dev.pop(len(added) + 1)
        assert [c.head for c in popped] == [h for h, _ in added]
        device.complete(added, 40, batched)
        got = drv.get_used()
        assert [h for h, _ in got] == [h for h, _ in added]
        assert [n for _, n in got] == [0] * (len(added) - 1) + [40]
        assert drv.free_count == size
    assert drv.in_order


def test_in_order_batch_returned_in_parts_when_caller_takes_few():
    g = make_guest()
    drv, dev, device = make_rings(g, 16, packed=True)
    buf = g.alloc(64)
    heads = [drv.add([], [(buf, 64)]) for _ in range(10)]
    drv.publish()
    dev.pop(16)
    device.complete([(h, 1) for h in heads], 64, batched=True)
    first, rest = drv.get_used(3), drv.get_used()
    assert [h for h, _ in first + rest] == heads
    assert [n for _, n in first + rest] == [0] * 9 + [64]


def test_in_order_device_naming_a_chain_not_in_flight_is_an_error():
    from vhu._ring import RingError
    g = make_guest()
    drv, dev, device = make_rings(g, 8, packed=False)
    buf = g.alloc(64)
    drv.add([(buf, 64)])
    drv.publish()
    dev.pop(8)
    device.complete([(5, 1)], 0, batched=True)       # id 5 was never made available
    with pytest.raises(RingError):
        drv.get_used()


# -- device side: vhu's own packed transmit queue under IN_ORDER ---------------

IN_ORDER = 1 << 35


def used_slots(g, desc, size, wrap_bits):
    """Positions whose flags say used in the lap of wrap_bits."""
    flags = [struct.unpack_from("<H", g.read(desc + 16 * i + 14, 2))[0] for i in range(size)]
    return [i for i, f in enumerate(flags) if f & (F_AVAIL | F_USED) == wrap_bits]


@SETTINGS
@given(size=st.sampled_from([1, 2, 4, 16, 256]),
       batches=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 3)), min_size=1, max_size=30))
def test_in_order_transmit_queue_publishes_one_used_descriptor_a_batch(size, batches):
    """A packed transmit queue with IN_ORDER negotiated returns each batch
    with one used descriptor (in the batch's first slot, naming its last
    buffer), as DPDK's in-order dequeue does; vhu's own driver and the
    others' hand every chain back, in order, for every batch after."""
    g = make_guest()
    desc = g.alloc(16 * size, align=16)
    avail, used = g.alloc(4, align=4), g.alloc(4, align=4)
    drv = DriverRing(g.driver_mem, size, desc, avail, used, packed=True, in_order=True)
    dev = DeviceRing(g.device_mem, size, desc, avail, used, addr_space="gpa",
                     features=VERSION_1 | IN_ORDER, packed=True, device_reads=True)
    buf = g.alloc(64)
    first_pos, wrap = 0, 1
    for count, ndesc in batches:
        ndesc = min(ndesc, size)
        added = []
        while len(added) < count and drv.free_count >= ndesc:
            added.append(drv.add([(buf, 8)] * ndesc))
        drv.publish()
        popped = dev.pop(len(added) + 1)
        assert [c.head for c in popped] == added
        for c in popped:
            dev.push(c.head, 0)
        pushed_before = dev.stats["pushed"]
        dev.publish()
        if added:
            # Exactly one slot of this batch says used: its first.
            bits = (F_AVAIL | F_USED) if wrap else 0
            span = [(first_pos + k) % size for k in range(len(added) * ndesc)]
            now_used = set(used_slots(g, desc, size, bits)) & set(span)
            assert now_used == {first_pos}
            entry = struct.unpack_from("<IH", g.read(desc + 16 * first_pos + 8, 6))
            assert entry == (0, added[-1])
            first_pos += len(added) * ndesc
            while first_pos >= size:
                first_pos -= size
                wrap ^= 1
        got = drv.get_used()
        assert [h for h, _ in got] == added
        assert drv.free_count == size
        assert dev.stats["pushed"] == pushed_before + len(added)


@pytest.mark.parametrize("device_reads,features", [(True, VERSION_1), (False, VERSION_1 | IN_ORDER)],
                         ids=["transmit-without-in-order", "receive-with-in-order"])
def test_every_used_descriptor_written_where_lengths_or_order_are_not_known(device_reads, features):
    """Without IN_ORDER the driver finds each buffer by its own used
    descriptor; on a receive queue each frame's length is in its own: one
    used descriptor per buffer there."""
    g = make_guest()
    size = 16
    desc = g.alloc(16 * size, align=16)
    avail, used = g.alloc(4, align=4), g.alloc(4, align=4)
    drv = DriverRing(g.driver_mem, size, desc, avail, used, packed=True,
                     in_order=bool(features & IN_ORDER))
    dev = DeviceRing(g.device_mem, size, desc, avail, used, addr_space="gpa",
                     features=features, packed=True, device_reads=device_reads)
    buf = g.alloc(64)
    heads = [drv.add([(buf, 64)]) if device_reads else drv.add([], [(buf, 64)]) for _ in range(6)]
    drv.publish()
    for i, c in enumerate(dev.pop(16)):
        dev.push(c.head, 0 if device_reads else 10 + i)
    dev.publish()
    assert used_slots(g, desc, size, F_AVAIL | F_USED) == list(range(6))
    got = drv.get_used()
    assert [h for h, _ in got] == heads
    assert [n for _, n in got] == ([0] * 6 if device_reads else [10 + i for i in range(6)])


@pytest.mark.parametrize("batch", [1, 6])
def test_replacement_resumes_past_a_batch_its_predecessor_published_one_slot_for(batch):
    """A worker that dies inside a batching publish, after the used slot's
    flags and before the position: the replacement (DeviceRing.resume)
    skips the slot and every chain of the batch it names, though they still
    look available, so no frame goes out twice and the driver gets the rest
    back in order."""
    g = make_guest()
    size = 16
    desc = g.alloc(16 * size, align=16)
    avail, used = g.alloc(4, align=4), g.alloc(4, align=4)
    drv = DriverRing(g.driver_mem, size, desc, avail, used, packed=True, in_order=True)
    buf = g.alloc(64)
    first = [drv.add([(buf, 8)]) for _ in range(batch)]
    later = [drv.add([(buf, 8)]) for _ in range(3)]
    drv.publish()
    # The predecessor's publish, cut short: slot 0 written used, naming the
    # batch's last buffer; the position (where a replacement starts) still 0.
    g.write(desc + 8, struct.pack("<IH", 0, first[-1]))
    g.write(desc + 14, struct.pack("<H", F_AVAIL | F_USED))
    dev = DeviceRing(g.device_mem, size, desc, avail, used, addr_space="gpa",
                     features=VERSION_1 | IN_ORDER, packed=True, device_reads=True)
    assert dev.resume() == batch
    popped = dev.pop(size)
    assert [c.head for c in popped] == later
    for c in popped:
        dev.push(c.head, 0)
    dev.publish()
    assert [h for h, _ in drv.get_used()] == first + later
    assert drv.free_count == size
