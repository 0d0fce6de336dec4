"""vhu.placement: queue pairs round-robin over all workers as they come up."""
from vhu.placement import Placement


def test_single_queue_ports_spread_over_every_worker():
    p = Placement(2, cross_delivery=True)
    # 64 single-queue ports on 2 workers: 32 each, alternating in arrival order.
    assert [p.worker(port, 0) for port in range(64)] == [0, 1] * 32
    assert {w: len(v) for w, v in p.per_worker().items()} == {0: 32, 1: 32}
    assert p.worker(5, 0) == 1                      # a placed queue pair stays put


def test_least_loaded_after_ports_leave_and_ring_roles():
    p = Placement(3, cross_delivery=True)
    for port in range(6):
        p.worker(port, 0)                           # 0 1 2 0 1 2
    p.release(1)
    p.release(4)                                    # worker 1 lost both its ports
    assert p.worker(10, 0) == 1 and p.worker(11, 0) == 1
    assert p.lookup(1, 0) is None
    # TX rings: their poller only; RX rings: every worker, owner first, shared.
    assert p.writers(10, 1) == [1]
    assert p.writers(10, 0) == [1, 0, 2] and p.shared(10, 0) and not p.shared(10, 1)


def test_no_sharing_with_one_worker_or_apps_that_stay_in_a_port():
    assert Placement(1, cross_delivery=True).writers(0, 0) == [0]
    assert not Placement(1, cross_delivery=True).shared(0, 0)
    echo = Placement(4, cross_delivery=False)
    assert [echo.worker(0, q) for q in range(4)] == [0, 1, 2, 3]   # a 4-queue port: 4 workers
    assert echo.writers(0, 2) == [1] and not echo.shared(0, 2)
