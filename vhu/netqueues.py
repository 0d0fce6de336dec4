"""virtio-net's virtqueue numbering (virtio 1.x 5.1.2): receiveq N is
virtqueue 2N and transmitq N is 2N+1, so ring index i belongs to queue pair
i // 2, and its parity says which of the pair it is. The one owner of that
rule: the master's placement, the stats memory, the workers and
vhu.frontend ask here. Pure Python and free of I/O."""

RECEIVEQ, TRANSMITQ = 0, 1      # a ring's side within its queue pair


def queue_pair(index: int) -> int:
    """The queue pair ring `index` belongs to."""
    return index // 2


def side(index: int) -> int:
    """RECEIVEQ or TRANSMITQ: which ring of its pair `index` is."""
    return index % 2


def is_transmitq(index: int) -> bool:
    """A transmitq: the device reads its buffers (the front-end's frames)."""
    return side(index) == TRANSMITQ


def ring_index(pair: int, which: int) -> int:
    """The ring index of queue pair `pair`'s receiveq or transmitq."""
    return 2 * pair + which
