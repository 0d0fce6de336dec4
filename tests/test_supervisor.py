"""Supervised workers (vhu.workers.supervisor), driven directly: a worker
that dies, hangs or is killed by a guest's memory is replaced, the rings it
ran resume where its last published batch left them, replies are matched
to their requests, and a storm of ring updates coalesces into a few packets.

The driver side is our own (vhu._ring.DriverRing over a memfd), so every
chain is accounted for: each one made available comes back used exactly
once, none is lost across a replacement.
"""
import os
import signal
import time

import pytest

from tests.test_worker import FEATURES, GUEST, UVA, Guest
from tests.workerpool import PoolThread
from vhu._mem import GuestMemory
from vhu._ring import DriverRing
from vhu.workers.process import RingSetup
from vhu.workers.supervisor import PACKET_INTERVAL, REPLACED, WORKER_DEADLINE

PACKED = 1 << 34
RING = 256


def wait_for(cond, timeout=15.0):
    t = time.monotonic() + timeout
    while time.monotonic() < t:
        if cond():
            return True
        time.sleep(0.01)
    return False


class Replayed:
    """What the master's ports do for a replacement: the memory table and
    the TX ring, resumed (split: at used->idx; packed: at the position the
    dead worker published, read from shared memory)."""

    def __init__(self, guest, setup):
        self.guest, self.setup, self.pool, self.kick = guest, setup, None, None
        self.calls = 0

    def __call__(self, index):
        self.calls += 1
        base = self.pool.stats.position(0, 1) if self.setup.packed else self.setup.base
        resumed = RingSetup(**{**self.setup.__dict__, "base": base, "resume": True})
        return [("mem", (0, [(0, GUEST, UVA, 0)]), [os.dup(self.guest.fd)], None),
                ("ring_start", (0, 1, resumed), [os.dup(self.kick), os.eventfd(0)], None)]


def tx_ring(guest, packed):
    mem = GuestMemory()
    mem.set_table([(guest.fd, 0, GUEST, UVA, 0)])
    d, a, u = 0x10000, 0x14000, 0x18000
    drv = DriverRing(mem, RING, d, a, u, packed=packed)
    features = FEATURES | (PACKED if packed else 0)
    # A packed ring starts in lap 1: the wrap counter (base bit 15) is set.
    setup = RingSetup(RING, UVA + d, UVA + a, UVA + u, 1 << 15 if packed else 0, features,
                      False, True, True, packed=packed)
    return mem, drv, setup


@pytest.fixture
def guest():
    g = Guest()
    yield g
    g.close()


def send(guest, drv, n, seed):
    base = 0x800000
    for i in range(n):
        gpa = base + ((seed + i) % 1024) * 2048
        guest.mem.write(gpa, bytes(12) + bytes([(seed + i) & 0xFF]) * 60)
        drv.add([(gpa, 72)])
    drv.publish()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_killed_worker_is_replaced_and_its_ring_resumes(guest, packed):
    """SIGKILL the worker between batches, ten times: each time a new worker
    takes the ring over; every chain comes back used exactly once and the
    sink's count is exact (nothing was in flight at the kill)."""
    _, drv, setup = tx_ring(guest, packed)
    back = UsedBack(drv)
    replay = Replayed(guest, setup)
    with PoolThread(1, app="sink", poll="epoll", replay=replay) as w:
        replay.pool = w.pool
        replay.kick = os.eventfd(0, os.EFD_NONBLOCK)
        w.call("mem", 0, [(0, GUEST, UVA, 0)], fds=[os.dup(guest.fd)])
        w.call("ring_start", 0, 1, setup, fds=[os.dup(replay.kick), os.eventfd(0)])
        used = 0
        for round_ in range(10):
            send(guest, drv, 100, round_ * 100)
            os.eventfd_write(replay.kick, 1)
            assert wait_for(lambda: back.reaches(used + 100)), f"round {round_}: chains not all used"
            used += 100
            pid = w.pids()[0]
            os.kill(pid, signal.SIGKILL)
            assert wait_for(lambda: w.pids()[0] != pid and w.replacements == round_ + 1)
            # the replacement answers (its ring is running again)
            assert wait_for(lambda: w.call("ring_status", 0, 1) is not None, 10)
        send(guest, drv, 50, 7)
        os.eventfd_write(replay.kick, 1)
        assert wait_for(lambda: back.reaches(used + 50))
        assert replay.calls == 10
        assert int(w.stats.ring(0, 1)[_index("tx_frames")]) == 1050
        os.close(replay.kick)


class UsedBack:
    """Counts the chains a driver ring got back used, each once."""

    def __init__(self, drv):
        self.drv, self.n = drv, 0

    def reaches(self, want):
        self.n += len(self.drv.get_used())
        assert self.n <= want, f"{self.n} chains back used, only {want} made available"
        return self.n == want


def _index(name):
    from vhu._ring import COUNTER_NAMES
    return COUNTER_NAMES.index(name)


def test_hung_worker_is_replaced_and_a_late_answer_is_never_taken(guest):
    """SIGSTOP the worker with a command in flight: it is presumed hung after
    WORKER_DEADLINE, killed and replaced; the command is settled REPLACED, and
    the next GET_VRING_BASE-like command gets its own answer, not a stale one."""
    _, drv, setup = tx_ring(guest, False)
    back = UsedBack(drv)
    replay = Replayed(guest, setup)
    with PoolThread(1, app="sink", poll="epoll", replay=replay) as w:
        replay.pool = w.pool
        replay.kick = os.eventfd(0, os.EFD_NONBLOCK)
        w.call("mem", 0, [(0, GUEST, UVA, 0)], fds=[os.dup(guest.fd)])
        w.call("ring_start", 0, 1, setup, fds=[os.dup(replay.kick), os.eventfd(0)])
        send(guest, drv, 5, 0)
        os.eventfd_write(replay.kick, 1)
        assert wait_for(lambda: back.reaches(5))
        pid = w.pids()[0]
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        pending = w.submit("ring_status", 0, 1)
        assert pending.result(30) is REPLACED
        took = time.monotonic() - t0
        assert WORKER_DEADLINE * 0.9 <= took < WORKER_DEADLINE + 2.0, took
        assert w.pids()[0] != pid
        assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10), "hung worker not reaped"
        send(guest, drv, 3, 5)
        os.eventfd_write(replay.kick, 1)
        assert wait_for(lambda: back.reaches(8))
        assert w.call("ring_stop", 0, 1) == 8
        os.close(replay.kick)


def test_memory_fault_is_attributed_to_the_port_that_caused_it(guest):
    """A front-end shrinks the memfd it shared: the worker dies of SIGBUS on
    its next access; the fault guard names port 3 (not 0), and the pool tells
    on_fault before it replays anything."""
    fd = os.memfd_create("shrinking")
    os.ftruncate(fd, GUEST)
    victim = GuestMemory()
    victim.set_table([(fd, 0, GUEST, UVA, 0)])
    d, a, u = 0x10000, 0x14000, 0x18000
    drv = DriverRing(victim, RING, d, a, u)
    setup = RingSetup(RING, UVA + d, UVA + a, UVA + u, 0, FEATURES, False, True, True)
    with PoolThread(1, app="sink", poll="epoll", ports=4) as w:
        kick = os.eventfd(0, os.EFD_NONBLOCK)
        w.call("mem", 0, [(0, GUEST, UVA, 0)], fds=[os.dup(guest.fd)])      # an innocent port 0
        w.call("mem", 3, [(0, GUEST, UVA, 0)], fds=[os.dup(fd)])
        w.call("ring_start", 3, 1, setup, fds=[os.dup(kick), os.eventfd(0)])
        victim.write(0x800000, bytes(72))
        drv.add([(0x800000, 72)])
        drv.publish()
        os.ftruncate(fd, 0)
        os.eventfd_write(kick, 1)
        assert wait_for(lambda: w.faults), "no fault reported"
        port, sig, addr = w.faults[0]
        assert (port, sig) == (3, signal.SIGBUS)
        assert addr != 0
        assert w.replacements == 1
        os.close(kick)
    victim.clear()
    os.close(fd)


def test_a_storm_of_ring_updates_coalesces(guest):
    """Enable toggles of one ring queued one at a time, as a front-end sends
    them (each in its own loop callback), as fast as they come: the worker
    gets at most one packet per PACKET_INTERVAL, and ends in the last state."""
    _, drv, setup = tx_ring(guest, False)
    back = UsedBack(drv)
    with PoolThread(1, app="sink", poll="epoll") as w:
        kick = os.eventfd(0, os.EFD_NONBLOCK)
        w.call("mem", 0, [(0, GUEST, UVA, 0)], fds=[os.dup(guest.fd)])
        w.call("ring_start", 0, 1, setup, fds=[os.dup(kick), os.eventfd(0)])
        before, t0 = w.pool.packets, time.monotonic()
        futs = [w.submit("ring_update", 0, 1, i % 2 == 0, False,
                         fds=[os.dup(kick), os.eventfd(0)], key=("ring", 0, 1))
                for i in range(2000)]
        for f in futs:
            assert f.result(60) is True
        took = time.monotonic() - t0
        packets = w.pool.packets - before
        most = took / PACKET_INTERVAL + 5
        assert packets <= most, f"{packets} packets in {took:.2f} s for 2000 updates"
        # The last toggle (i = 1999) disabled the TX ring: enable it, it is served.
        w.call("ring_update", 0, 1, True, False, fds=[os.dup(kick), os.eventfd(0)])
        send(guest, drv, 4, 0)
        os.eventfd_write(kick, 1)
        assert wait_for(lambda: back.reaches(4))
        assert len(os.listdir("/proc/self/fd")) < 200, "coalesced fds were not closed"
        os.close(kick)
