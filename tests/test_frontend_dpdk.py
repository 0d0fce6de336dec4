"""vhu.frontend against DPDK 22.11's vhost-user back-end (testpmd --vdev net_vhost0,iface=SOCK).

Needs dpdk-testpmd (scripts/setup-peers.sh). Missing: skipped with the reason,
or failed under CI=true. testpmd runs on CPU 0 without hugepages.
"""
import os
import time

import pytest

from tests.vhuproc import frontend_process
from vhu.frontend import Frontend
from vhu.protocol.messages import VirtioFeature as VF
from vhu.testbed.dpdk import Testpmd, vhost_vdev

Testpmd.__test__ = False   # a peer, not a test class

pytestmark = pytest.mark.peers("testpmd")


@pytest.fixture
def sock(tmp_path):
    return str(tmp_path / "vhost.sock")


def backend(sock, mode, queues=1):
    return Testpmd([vhost_vdev(sock, queues=queues)], forward_mode=mode, cpus=0, huge=False,
                   rxq=queues, txq=queues)


def test_tx_into_rxonly_counts_exactly(sock):
    with backend(sock, "rxonly") as tp:
        tp.start()
        with Frontend(sock) as fe:
            r = fe.run("tx", count=100_000, duration=60)
        time.sleep(0.3)
        got = tp.stop()[0]
    assert (r.tx_packets, r.errors) == (100_000, 0)
    assert got["rx_packets"] == 100_000 and got["rx_dropped"] == 0


def test_rx_from_txonly(sock):
    with backend(sock, "txonly") as tp:
        tp.start()
        with Frontend(sock) as fe:
            r = fe.run("rx", duration=1.5)
        sent = tp.stop()[0]["tx_packets"]
    assert r.rx_packets > 1000 and r.rx_bytes == 64 * r.rx_packets and r.errors == 0
    # What testpmd sent after our last look sits unread in our RX ring (at most a ring's worth).
    assert 0 <= sent - r.rx_packets <= fe.ring_size, (sent, r.rx_packets)


@pytest.mark.parametrize("kw", [{}, {"legacy": True}, {"packed": True}, {"queues": 2}],
                         ids=["split", "legacy", "packed", "two-queues"])
def test_loop_through_io_forwarding(sock, kw):
    """testpmd io with one port sends every frame back to the same port and queue."""
    with backend(sock, "io", kw.get("queues", 1)) as tp:
        tp.start()
        with Frontend(sock, **kw) as fe:
            if kw.get("legacy"):
                assert fe.hdr_len == 10 and not fe.features >> VF.VERSION_1 & 1
            if kw.get("packed"):
                assert fe.features >> VF.RING_PACKED & 1
            r = fe.run("loop", duration=1.5)
        fwd = tp.stop()[0]
    assert r.tx_packets > 1000, r.summary()
    assert r.rx_packets == r.tx_packets and r.errors == 0, r.summary()
    assert fwd["rx_packets"] == fwd["tx_packets"] == r.tx_packets


def test_listen_for_net_vhost_in_client_mode(sock):
    """--listen: testpmd's net_vhost0 with client=1 connects to us."""
    with frontend_process("--socket", sock, "--listen", "--mode", "tx", "--count", 50000,
                          "--duration", 30, "--quiet") as fe:
        with Testpmd([vhost_vdev(sock, client=True)], forward_mode="rxonly", cpus=0,
                     huge=False) as tp:
            tp.start()
            out, err = fe.communicate(timeout=60)
            # Port counters: testpmd's start drops what arrived before it
            # (flush_fwd_rx_queues), which its forward statistics miss.
            got = tp.port_stats()[0]["rx_packets"]
    assert fe.returncode == 0, err
    assert "tx 50000 packets 3200000 bytes" in out
    assert got == 50000
    assert not os.path.exists(sock)
