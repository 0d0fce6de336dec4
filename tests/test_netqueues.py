"""virtio-net's virtqueue numbering (virtio 1.x 5.1.2), as vhu.netqueues owns it."""
from vhu.netqueues import RECEIVEQ, TRANSMITQ, is_transmitq, queue_pair, ring_index, side


def test_receiveq_n_is_2n_and_transmitq_n_is_2n_plus_1():
    assert [ring_index(n, RECEIVEQ) for n in range(3)] == [0, 2, 4]
    assert [ring_index(n, TRANSMITQ) for n in range(3)] == [1, 3, 5]
    assert [is_transmitq(i) for i in range(4)] == [False, True, False, True]


def test_every_ring_index_round_trips_through_its_pair_and_side():
    for i in range(2 * 256):
        assert ring_index(queue_pair(i), side(i)) == i
