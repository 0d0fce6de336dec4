"""The cross-worker RX-ring lock (vhu/workers/_shared.pxi), through the real
code path: several worker processes, each a compiled Engine (app patch)
polling its own TX ring, all deliver into one shared RX ring. The driver side
of every ring is this test process (as tests/test_worker.py does)."""
import mmap
import multiprocessing
import os
import struct
import time

import numpy as np
import pytest

from tests.test_worker import FEATURES, GUEST, HDR, UVA
from vhu._mem import GuestMemory
from vhu._ring import COUNTER_NAMES, DeviceRing, DriverRing
from vhu.workers import shared
from vhu.workers._engine import Engine, rx_lock_hold

C = len(COUNTER_NAMES)
RING_SIZE = 256
POSITION = COUNTER_NAMES.index("state_position")
CONTENDED = COUNTER_NAMES.index("rx_contended")
NO_ROOM = COUNTER_NAMES.index("rx_no_room")
RX_FRAMES = COUNTER_NAMES.index("rx_frames")


def ring_addrs(n):
    base = 0x10000 * n
    return base, base + 0x2000, base + 0x4000


def device_ring(mem, n, counters=None):
    d, a, u = ring_addrs(n)
    ring = DeviceRing(mem, RING_SIZE, UVA + d, UVA + a, UVA + u, event_idx=True,
                      features=FEATURES)
    if counters is not None:
        ring.last_avail_idx = 0       # private: the shared position is the test's
        ring.bind_counters(counters, 0)
    return ring


def hog(guest_fd, counters_fd, stop, ready):
    """A slow worker: takes the shared ring's lock over and over and keeps it
    a while (as a worker descheduled inside its batch would), so the
    producers find it taken: their backlogs and retries are what is tested."""
    mem = GuestMemory()
    mem.set_table([(guest_fd, 0, GUEST, UVA, 0)])
    counters = mmap.mmap(counters_fd, C * 8)
    rx = device_ring(mem, 0, counters)
    ready.set()
    while not stop.is_set():
        rx_lock_hold(rx, 9, 0.0002)
        time.sleep(0.0002)


def producer(index, guest_fd, counters_fd, stop, ready):
    """Worker `index`: polls TX ring index+1, delivers into the shared RX ring 0."""
    mem = GuestMemory()
    mem.set_table([(guest_fd, 0, GUEST, UVA, 0)])
    counters = mmap.mmap(counters_fd, C * 8)
    engine = Engine(app="patch", poll="busy", batch=256)
    engine.set_worker(index)
    tx = device_ring(mem, index + 1)
    rx = device_ring(mem, 0, counters)
    engine.set_bindings([dict(tx=tx, port=index + 1, queue=0, peer=1),
                         dict(rx=rx, port=0, queue=0, rx_shared=True)])
    ready.set()
    while not stop.is_set():
        engine.run(0.01)
    engine.set_bindings([])           # drains the backlog (nothing may be left)


class Driver:
    """The guest side: one TX ring per producer, the shared RX ring."""

    def __init__(self, nprod):
        self.fd = os.memfd_create("guest")
        os.ftruncate(self.fd, GUEST)
        self.mem = GuestMemory()
        self.mem.set_table([(self.fd, 0, GUEST, UVA, 0)])
        self.rx = DriverRing(self.mem, RING_SIZE, *ring_addrs(0), event_idx=True)
        self.tx = [DriverRing(self.mem, RING_SIZE, *ring_addrs(k + 1), event_idx=True)
                   for k in range(nprod)]
        self.rx_buf = {}
        for i in range(RING_SIZE):
            self._post(0x1000000 + i * 2048)
        self.rx.publish()
        # each producer: free TX buffers, head -> buffer
        self.tx_free = [[0x800000 + k * 0x100000 + i * 2048 for i in range(RING_SIZE)]
                        for k in range(nprod)]
        self.tx_busy = [dict() for _ in range(nprod)]

    def _post(self, gpa):
        self.rx_buf[self.rx.add([], [(gpa, 2048)])] = gpa

    def send(self, k, frames, publish=True):
        for f in frames:
            gpa = self.tx_free[k].pop()
            self.mem.write(gpa, bytes(HDR) + f)
            self.tx_busy[k][self.tx[k].add([(gpa, HDR + len(f))])] = gpa
        if publish:
            self.tx[k].publish()

    def reclaim_tx(self, k):
        for head, _ in self.tx[k].get_used():
            self.tx_free[k].append(self.tx_busy[k].pop(head))

    def receive(self):
        out, back = [], []
        for head, length in self.rx.get_used():
            gpa = self.rx_buf.pop(head)
            out.append(self.mem.read(gpa, length)[HDR:])
            back.append(gpa)
        for gpa in back:              # after reading all: a freed head is given out again
            self._post(gpa)
        if out:
            self.rx.publish()
        return out

    def close(self):
        os.close(self.fd)


def frame(k, seq):
    # Sizes vary so that frames of different producers differ in length too.
    body = struct.pack("<BI", k, seq)
    return b"\x02" * 12 + b"\x08\x00" + body + bytes((seq * 37 + k * 500) % 1400 + 40)


@pytest.mark.parametrize("nprod", [2, 3])
def test_producers_share_one_rx_ring_every_frame_once_in_order(nprod):
    total = 20000                    # frames per producer
    window = RING_SIZE // nprod     # in flight per producer: never more than the ring holds
    ctx = multiprocessing.get_context("fork")
    drv = Driver(nprod)
    cfd = os.memfd_create("counters")
    os.ftruncate(cfd, C * 8)
    counters = np.frombuffer(mmap.mmap(cfd, C * 8), dtype=np.uint64)
    stop = ctx.Event()
    readies = [ctx.Event() for _ in range(nprod + 1)]
    procs = [ctx.Process(target=producer, args=(k, drv.fd, cfd, stop, readies[k]))
             for k in range(nprod)]
    procs.append(ctx.Process(target=hog, args=(drv.fd, cfd, stop, readies[nprod])))
    counters[shared.RX_LOCK] = shared.holder_word(9)
    for p in procs:
        p.start()
    try:
        for r in readies:
            assert r.wait(30)
        sent = [0] * nprod
        got = [[] for _ in range(nprod)]
        # First round with the lock held by a worker that is inside its batch
        # (the hog may never be scheduled at the right moment on a busy
        # machine): the producers meet it, keep their frames and retry.
        # Taken before any process starts: a plain store over a lock the hog
        # held would be undone by the hog's release.
        for k in range(nprod):
            drv.send(k, [frame(k, s) for s in range(window // 2)])
            sent[k] = window // 2
        deadline = time.monotonic() + 60
        while counters[CONTENDED] < nprod:
            assert time.monotonic() < deadline, f"rx_contended {int(counters[CONTENDED])}"
            time.sleep(0.01)
        assert drv.receive() == []               # held back, not delivered past the lock
        counters[shared.RX_LOCK] = 0             # the holder gives it back, nothing delivered
        deadline = time.monotonic() + 120
        while any(len(g) < total for g in got):
            assert time.monotonic() < deadline, f"stalled: {[len(g) for g in got]} of {total}"
            # Every producer's next frames are written first and made available
            # together, so that the producers run into the ring at the same time.
            ready = []
            for k in range(nprod):
                drv.reclaim_tx(k)
                room = min(window - (sent[k] - len(got[k])), total - sent[k],
                           len(drv.tx_free[k]))
                if room >= window // 2 or (room > 0 and sent[k] + room == total):
                    drv.send(k, [frame(k, s) for s in range(sent[k], sent[k] + room)],
                             publish=False)
                    sent[k] += room
                    ready.append(k)
            for k in ready:
                drv.tx[k].publish()
            for f in drv.receive():
                k, seq = struct.unpack_from("<BI", f, 14)
                assert f == frame(k, seq), "frame corrupted"
                got[k].append(seq)
        stop.set()
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        assert drv.receive() == []               # nothing extra after the last one
        for k in range(nprod):
            assert got[k] == list(range(total)), f"producer {k}: lost, doubled or reordered"
        assert counters[NO_ROOM] == 0
        assert counters[RX_FRAMES] == nprod * total
        assert counters[POSITION] == (nprod * total) % 65536
        assert counters[shared.RX_LOCK] == 0      # left free
        print(f"\n{nprod} producers: rx_contended {int(counters[CONTENDED])} batches")
        assert counters[CONTENDED] >= nprod, "the producers never met at the lock"
    finally:
        stop.set()
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        drv.close()
        os.close(cfd)


def test_a_dead_holders_lock_is_released_and_the_ring_goes_on():
    """Worker 5 'dies' holding the lock: the others hold their frames back
    (counting rx_contended, never spinning); once the master releases it
    (release_locks), delivery resumes from the last published position."""
    drv = Driver(1)
    cfd = os.memfd_create("counters")
    os.ftruncate(cfd, 2 * C * 8)
    cmap = mmap.mmap(cfd, 2 * C * 8)
    array = np.frombuffer(cmap, dtype=np.uint64).reshape(1, 1, 2, C)   # [port, pair, ring, counter] as in StatsMemory
    mem = GuestMemory()
    mem.set_table([(drv.fd, 0, GUEST, UVA, 0)])
    engine = Engine(app="patch", poll="busy", batch=32)
    engine.set_worker(0)
    tx = device_ring(mem, 1)
    rx = device_ring(mem, 0, cmap)
    engine.set_bindings([dict(tx=tx, port=1, queue=0, peer=1),
                         dict(rx=rx, port=0, queue=0, rx_shared=True)])
    try:
        drv.send(0, [frame(0, s) for s in range(10)])
        engine.run(0.02)
        assert [struct.unpack_from("<BI", f, 14)[1] for f in drv.receive()] == list(range(10))
        array[0, 0, 0, shared.RX_LOCK] = shared.holder_word(5)       # held by a dead worker
        assert shared.locks_held(array) == {(0, 0): 5}
        drv.reclaim_tx(0)
        drv.send(0, [frame(0, s) for s in range(10, 20)])
        engine.run(0.05)
        assert drv.receive() == []                   # held back, not lost
        assert engine.shared_state() == {(0, 0): 10}
        assert array[0, 0, 0, CONTENDED] >= 1
        assert shared.release_locks(array, shared.holder_word(4)) == []   # not its lock
        assert shared.release_locks(array, shared.holder_word(5, 1)) == []  # nor its successor's
        assert shared.release_locks(array, shared.holder_word(5)) == [(0, 0)]
        engine.run(0.05)
        assert [struct.unpack_from("<BI", f, 14)[1] for f in drv.receive()] == list(range(10, 20))
        assert array[0, 0, 0, shared.RX_LOCK] == 0
        assert array[0, 0, 0, POSITION] == 20
        assert engine.shared_state() == {(0, 0): 0}
    finally:
        engine.set_bindings([])
        del tx, rx, engine
        mem.clear()
        drv.close()
        os.close(cfd)


def test_two_workers_share_one_mac_table():
    """A station learned by worker A (its port) is found by worker B, which
    then sends to that port alone instead of flooding; both deliver into
    the RX rings they share under the lock."""
    from tests.test_apps_engine import BCAST, eth, mac
    from tests.test_worker import Guest
    g = Guest()
    macs_mem = shared.MacMemory()
    macs = mmap.mmap(macs_mem.fd, shared.MacMemory.SIZE)
    cmap = mmap.mmap(-1, 3 * 2 * C * 8)     # ports x (rx, tx) counter rows, shared by both
    mem = GuestMemory()
    mem.set_table([(g.fd, 0, GUEST, UVA, 0)])
    drivers = [g.rings(p) for p in range(3)]

    def ring(p, kind, counters=True):
        r = g.device_ring(mem, drivers[p][kind][1])
        if counters:
            if kind == 0:
                r.last_avail_idx = 0
            r.bind_counters(cmap, (2 * p + kind) * C * 8)
        return r

    def engine(worker, own, other):
        e = Engine(app="switch", poll="busy", mac_ageing=0.5)
        e.set_worker(worker)
        e.set_mac_memory(macs)
        pairs = [dict(rx=ring(p, 0), tx=ring(p, 1), port=p, queue=0, rx_shared=True)
                 for p in own]
        pairs += [dict(rx=ring(p, 0), port=p, queue=0, rx_shared=True) for p in other]
        e.set_bindings(pairs)
        return e
    a = engine(0, [0, 2], [1])
    b = engine(1, [1], [0, 2])
    for p in range(3):
        g.post_rx(drivers[p][0][0], p, 64)

    def received():
        return [g.received(drivers[p][0][0], p) for p in range(3)]
    try:
        hello = eth(BCAST, mac(1), fill=1)
        g.send(drivers[0][1][0], 0, [hello])
        a.run(0.02)
        assert received() == [[], [hello], [hello]]        # flooded by worker A
        to_1 = eth(mac(1), mac(2), fill=2)
        g.send(drivers[1][1][0], 1, [to_1])
        b.run(0.02)
        assert received() == [[to_1], [], []], "worker B knew where mac 1 is"
        assert dict(b.mac_table()) == dict(a.mac_table()) == {
            int.from_bytes(mac(1), "big"): 0, int.from_bytes(mac(2), "big"): 1}
        a.forget_port(1)
        assert b.mac_table() == {int.from_bytes(mac(1), "big"): 0}
        time.sleep(0.6)                                  # aged out, as before
        assert b.mac_table() == {}
        g.send(drivers[1][1][0], 1, [to_1])
        b.run(0.02)
        assert received() == [[to_1], [], [to_1]]          # unknown again: flooded
        # A worker remembers a lookup for the rest of one batch, no longer:
        # a station worker A learns between two of B's batches is found by
        # B's very next batch, not flooded to from a remembered miss.
        to_3 = eth(mac(3), mac(2), fill=3)
        g.send(drivers[1][1][0], 1, [to_3, to_3])
        b.run(0.02)
        assert received() == [[to_3, to_3], [], [to_3, to_3]], "unknown: both flooded"
        g.send(drivers[2][1][0], 2, [eth(BCAST, mac(3), fill=4)])
        a.run(0.02)                                      # A learns mac 3 behind port 2
        received()
        g.send(drivers[1][1][0], 1, [to_3])
        b.run(0.02)
        assert received() == [[], [], [to_3]], "B's next batch found what A learned"
        rows = np.frombuffer(cmap, dtype=np.uint64).reshape(3, 2, C)
        assert (rows[:, :, shared.RX_LOCK] == 0).all()
    finally:
        a.set_bindings([])
        b.set_bindings([])
        del a, b
        mem.clear()
        macs_mem.close()
        g.close()


def test_epochs_keep_a_stale_writer_out_and_wait_for_the_owner():
    """A worker given start 1 of a shared ring waits (backlog) until the
    owner has begun that start, and stops delivering once the ring was
    started again (start 2) instead of publishing over it."""
    EPOCH = COUNTER_NAMES.index("state_rx_epoch")
    drv = Driver(1)
    cmap = mmap.mmap(-1, 2 * C * 8)
    array = np.frombuffer(cmap, dtype=np.uint64).reshape(1, 2, C)
    mem = GuestMemory()
    mem.set_table([(drv.fd, 0, GUEST, UVA, 0)])
    owner = Engine(app="patch", poll="busy")
    owner.set_worker(1)
    engine = Engine(app="patch", poll="busy")
    engine.set_worker(0)
    tx = device_ring(mem, 1)
    rx = device_ring(mem, 0, cmap)
    engine.set_bindings([dict(tx=tx, port=1, queue=0, peer=1),
                         dict(rx=rx, port=0, queue=0, rx_shared=True, rx_epoch=1)])
    try:
        drv.send(0, [frame(0, s) for s in range(5)])
        engine.run(0.05)
        assert drv.receive() == [] and engine.shared_state() == {(0, 0): 5}  # owner not there yet
        assert owner.begin_shared_ring(device_ring(mem, 0, cmap), 1, 0)
        assert array[0, 0, EPOCH] == 1 and array[0, 0, shared.RX_LOCK] == 0
        engine.run(0.05)
        assert [struct.unpack_from("<BI", f, 14)[1] for f in drv.receive()] == list(range(5))
        # The front-end left and came back: start 2 at position 100.
        assert owner.begin_shared_ring(device_ring(mem, 0, cmap), 2, 100)
        drv.reclaim_tx(0)
        drv.send(0, [frame(0, s) for s in range(5, 10)])
        engine.run(0.05)
        assert drv.receive() == []                  # stale: nothing published
        assert array[0, 0, POSITION] == 100 and array[0, 0, EPOCH] == 2
        assert array[0, 0, shared.RX_LOCK] == 0
    finally:
        engine.set_bindings([])
        del tx, rx, engine, owner
        mem.clear()
        drv.close()
