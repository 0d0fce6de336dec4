"""Dirty-page logging on the device ring (vhu/_ring_log.pxi), as a migration needs it.

A driver ring (vhu._ring.DriverRing) and a device ring with logging on share
a multi-region guest memory (tests/guestmem.py: regions from non-zero mmap
offsets, buffers crossing region edges, front-end addresses unrelated to
guest-physical ones). Random batches: the driver makes chains available
(direct, several descriptors, indirect, crossing regions), the device
receives frames into them (merged or not), returns transmit chains, writes
into popped chains through the Python API, toggles notifications. Each
device phase starts from a snapshot of all guest memory and a clear log
(the front-end clears bits as it copies pages); after it, every guest page
whose bytes changed must have its bit in the log, in guest-physical page
numbers. The driver's own writes happen outside the device phases, so every
change a phase shows is the device's.
"""
import random

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from tests.guestmem import make_guest

compiled = pytest.importorskip("vhu._ring")

VERSION_1, MRG_RXBUF, INDIRECT = 1 << 32, 1 << 15, 1 << 28
PAGE = 4096
SETTINGS = settings(deadline=None, max_examples=30,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def bit(log, page):
    return page // 8 < len(log) and log[page // 8] >> (page % 8) & 1


def unmarked(guest, before, log):
    """Pages whose bytes changed since `before` and whose log bit is clear."""
    out = set()
    for gpa, n in guest.changed_ranges(before):
        for page in range(gpa // PAGE, (gpa + n - 1) // PAGE + 1):
            if not bit(log, page):
                out.add(page * PAGE)
    return sorted(out)


class Rig:
    def __init__(self, size, packed, mergeable, event_idx, regions=4):
        self.guest = g = make_guest(size=8 << 20, regions=regions, hole=0)
        self.size, self.packed = size, packed
        if packed:
            self.desc = g.alloc(16 * size, align=16)
            self.avail = g.alloc(4, align=4)
            self.used = g.alloc(4, align=4)
            used_len = 4
        else:
            self.desc = g.alloc(16 * size, align=16)
            self.avail = g.alloc(6 + 2 * size, align=2)
            self.used = g.alloc(6 + 8 * size, align=4)
            used_len = 6 + 8 * size
        self.used_len = used_len
        features = VERSION_1 | (MRG_RXBUF if mergeable else 0) | INDIRECT
        self.drv = compiled.DriverRing(g.driver_mem, size, self.desc, self.avail, self.used,
                                       event_idx=event_idx, packed=packed)
        self.dev = compiled.DeviceRing(g.device_mem, size, g.uva(self.desc), g.uva(self.avail),
                                       g.uva(self.used), addr_space="uva", event_idx=event_idx,
                                       indirect=True, features=features, packed=packed)
        if packed:
            self.dev.last_avail_idx = 0x8000
        self.log = bytearray(g.end // PAGE // 8 + 64)
        self.dev.set_log(self.log, 0, len(self.log), log_used=True, used_gpa=self.used)

    def close(self):
        self.guest.close()


def add_chain(rig, rnd, writable, indirect):
    """One chain of 1-3 buffers (some crossing a region edge), maybe indirect."""
    g = rig.guest
    n = rnd.randint(1, 3)
    bufs = []
    for _ in range(n):
        length = rnd.choice([64, 700, 1514, 2048, 5000])
        cross = length >= 2 and rnd.random() < 0.3 and g.can_cross(length)
        bufs.append((g.alloc(length, align=2, cross=cross), length))
    ind = g.alloc(16 * n, align=16) if indirect else None
    if writable:
        return rig.drv.add([], bufs, indirect_gpa=ind)
    for gpa, length in bufs:
        g.write(gpa, bytes(rnd.getrandbits(8) for _ in range(min(length, 32))))
    return rig.drv.add(bufs, [], indirect_gpa=ind)


def device_phase(rig, rnd, op):
    """One batch of device work; returns what it did (for the notes)."""
    dev = rig.dev
    if op == "rx":
        frames = [bytes([rnd.getrandbits(8)]) * rnd.choice([60, 1000, 1500, 3000, 9000])
                  for _ in range(rnd.randint(1, 6))]
        n = dev.rx_frames(frames)
        dev.publish()
        return f"rx {n}/{len(frames)}"
    if op == "tx":
        frames = dev.tx_frames(rnd.randint(1, 8))
        dev.publish()
        return f"tx {len(frames)}"
    if op == "pop":
        chains = dev.pop(rnd.randint(1, 8))
        for c in chains:
            written = 0
            for view in c.writable:
                k = rnd.randint(0, len(view))
                view[:k] = bytes([0xA5]) * k
                written += k
            dev.push(c.head, written)
        dev.publish()
        return f"pop {len(chains)}"
    if op == "notify":
        if rnd.random() < 0.5:
            dev.disable_notifications()
        else:
            dev.enable_notifications()
        return "notify"
    raise AssertionError(op)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), packed=st.booleans(), mergeable=st.booleans(),
       event_idx=st.booleans(), size=st.sampled_from([8, 64, 256]))
def test_every_page_the_device_changes_is_marked(seed, packed, mergeable, event_idx, size):
    rnd = random.Random(seed)
    rig = Rig(size, packed, mergeable, event_idx)
    try:
        marked_any = False
        for batch in range(12):
            # Driver phase (its writes are not the device's): reclaim, refill, publish.
            rig.drv.get_used()
            writable = rnd.random() < 0.6
            for _ in range(rnd.randint(0, 6)):
                if rig.drv.free_count < 4:
                    break
                try:
                    add_chain(rig, rnd, writable, indirect=rnd.random() < 0.3)
                except MemoryError:
                    break             # guest memory used up: the batches go on without new chains
            rig.drv.publish()
            if rnd.random() < 0.3:
                rig.drv.enable_interrupts()
            # Device phase, from a snapshot and a clear log.
            before = rig.guest.snapshot()
            rig.log[:] = bytes(len(rig.log))
            op = rnd.choice(["rx", "rx", "pop"] if writable else ["tx", "tx", "notify"])
            what = device_phase(rig, rnd, op)
            note(f"batch {batch}: {what}")
            missed = unmarked(rig.guest, before, rig.log)
            assert not missed, f"batch {batch} ({what}): pages written, not marked: " + \
                ", ".join(f"{p:#x}" for p in missed)
            marked_any |= any(rig.log)
        assert not rig.dev.broken, rig.dev.broken_reason
        if marked_any:
            assert rig.dev.stats["log_pages"] > 0
    finally:
        rig.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_merged_frame_marks_every_buffer_and_the_used_ring(packed):
    rig = Rig(64, packed, mergeable=True, event_idx=False)
    try:
        bufs = [rig.guest.alloc(1024, align=64) for _ in range(8)]
        for gpa in bufs:
            rig.drv.add([], [(gpa, 1024)])
        rig.drv.publish()
        before = rig.guest.snapshot()
        assert rig.dev.rx_frames([bytes(range(256)) * 24]) == 1      # 6144 bytes: 7 buffers
        rig.dev.publish()
        assert not unmarked(rig.guest, before, rig.log)
        for gpa in bufs[:7]:
            assert bit(rig.log, gpa // PAGE) and bit(rig.log, (gpa + 1023) // PAGE)
        if packed:                  # the used descriptors written back
            assert bit(rig.log, rig.desc // PAGE)
        else:                       # used entries and idx, at log_guest_addr
            assert bit(rig.log, rig.used // PAGE)
    finally:
        rig.close()


def test_logging_off_marks_nothing_and_on_again_marks():
    rig = Rig(64, False, mergeable=True, event_idx=True)
    try:
        rig.dev.set_log(None)
        assert not rig.dev.logging
        for _ in range(4):
            rig.drv.add([], [(rig.guest.alloc(2048), 2048)])
        rig.drv.publish()
        assert rig.dev.rx_frames([b"x" * 100] * 2) == 2
        rig.dev.publish()
        assert not any(rig.log) and rig.dev.stats["log_pages"] == 0
        rig.dev.set_log(rig.log, 0, len(rig.log), log_used=False)
        before = rig.guest.snapshot()
        assert rig.dev.rx_frames([b"y" * 100] * 2) == 2
        rig.dev.publish()
        changed = rig.guest.changed_ranges(before)
        # Without VHOST_VRING_F_LOG the used ring is not logged, the buffers are.
        outside = [gpa for gpa, _ in changed if not rig.used <= gpa < rig.used + rig.used_len]
        assert outside and all(bit(rig.log, gpa // PAGE) for gpa in outside)
    finally:
        rig.close()


def test_too_many_pages_in_a_batch_marks_all_guest_memory():
    """A hostile driver: 1024 chains on one 64 KiB buffer (17 pages each,
    more than a batch collects): every mapped page is marked instead."""
    rig = Rig(1024, False, mergeable=False, event_idx=False)
    try:
        buf = rig.guest.alloc(65536 + 12, align=4096)
        for _ in range(1024):
            rig.drv.add([], [(buf, 65536 + 12)])
        rig.drv.publish()
        chains = rig.dev.pop(1024)
        assert len(chains) == 1024
        for c in chains:
            rig.dev.push(c.head, 0)
        rig.dev.publish()
        for r in rig.guest.regions:
            for page in range(r.gpa // PAGE, r.end // PAGE):
                assert bit(rig.log, page)
    finally:
        rig.close()


def test_log_smaller_than_memory_marks_what_fits():
    rig = Rig(64, False, mergeable=True, event_idx=False)
    try:
        small = bytearray(8)           # pages 0..63 only: below the guest's memory
        rig.dev.set_log(small, 0, len(small), log_used=True, used_gpa=8 * PAGE)
        rig.drv.add([], [(rig.guest.alloc(2048), 2048)])
        rig.drv.publish()
        assert rig.dev.rx_frames([b"z" * 64]) == 1
        rig.dev.publish()
        assert small[1] & 1            # the used ring, logged at page 8
        with pytest.raises(ValueError):
            rig.dev.set_log(small, 4, 8)
    finally:
        rig.close()
