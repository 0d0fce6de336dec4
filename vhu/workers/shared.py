"""The master's side of what workers share (the engine's side is
vhu/workers/_shared.pxi): the RX-ring locks' release when a holder dies,
and the memory of the switch's shared MAC table.

The RX-ring lock of a ring is the `state_rx_lock` word of its counter row in
the stats memory (vhu.stats): 0 free, worker index + 1 while that worker
holds it (and above bit 16 how many times that worker index was replaced),
LOCK_DEAD after the master released it for a dead holder (the next holder
then checks where the ring really is, see rx_recover)."""
import mmap
import os

import numpy as np

from vhu._ring import COUNTER_NAMES
from vhu.netqueues import queue_pair, side
from vhu.workers._engine import LOCK_DEAD_WORD, MAC_TABLE_BYTES

RX_LOCK = COUNTER_NAMES.index("state_rx_lock")
LOCK_DEAD = LOCK_DEAD_WORD


def holder_word(worker, generation=0):
    """The lock word of worker `worker` after `generation` replacements
    (Engine.set_worker): the low 16 bits are the worker index + 1."""
    return ((generation & 0xFFFF) << 16) | (worker + 1)


def _lock_words(array):
    """The lock words of a counter array laid out as the stats memory is,
    [port, queue pair, RX or TX ring, counter] (vhu.stats.StatsMemory.array):
    a view [port, pair, ring of the pair]."""
    if array.ndim != 4 or array.shape[2] != 2:
        raise ValueError(f"a [port, pair, 2, counter] array expected, not {array.shape}")
    return array[..., RX_LOCK]


def release_locks(array, word):
    """Release every RX-ring lock the holder `word` (a worker that is dead:
    killed and reaped) holds, in a counter array (vhu.stats.StatsMemory.array).
    Returns the (port, ring) pairs released.
    Only the master calls this, and only for a worker that can no longer
    run: nobody but a holder ever stores its own word, and nobody can take
    a lock from it, so a plain store is enough."""
    words = _lock_words(array)
    ports, pairs, sides = np.nonzero(words == np.uint64(word))
    for p, q, s in zip(ports, pairs, sides):
        words[p, q, s] = np.uint64(LOCK_DEAD)
    return [(int(p), 2 * int(q) + int(s)) for p, q, s in zip(ports, pairs, sides)]


def free_lock(array, port, ring):
    """A ring that nobody runs (about to start): its lock is free."""
    _lock_words(array)[port, queue_pair(ring), side(ring)] = 0


def lock_word(array, port, ring):
    """The lock word of (port, ring) now."""
    return int(_lock_words(array)[port, queue_pair(ring), side(ring)])


def locks_held(array):
    """{(port, ring): holder worker} of every RX-ring lock held now."""
    words = _lock_words(array)
    ports, pairs, sides = np.nonzero((words != 0) & (words != np.uint64(LOCK_DEAD)))
    return {(int(p), 2 * int(q) + int(s)): (int(words[p, q, s]) & 0xFFFF) - 1
            for p, q, s in zip(ports, pairs, sides)}


class MacMemory:
    """The switch's MAC table, shared by every worker: a memfd the master
    creates and hands to each worker (with the stats memory)."""

    SIZE = -(-MAC_TABLE_BYTES // mmap.PAGESIZE) * mmap.PAGESIZE

    def __init__(self):
        self.fd = os.memfd_create("vhu-macs", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.SIZE)

    def dup_fd(self):
        return os.dup(self.fd)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
