"""Packed virtqueues end to end: vhu.master against DPDK 22.11 virtio-user
with packed_vq=1 (VIRTIO_F_RING_PACKED negotiated), as the split ring's tests.

testpmd runs on CPU 1, vhu's workers on CPU 0.
"""
import time

import pytest

from tests.vhuproc import VhuMaster
from vhu.testbed.dpdk import Testpmd, virtio_user_vdev

Testpmd.__test__ = False

pytestmark = pytest.mark.peers("testpmd")
VHU_CPU, PEER_CPU = "0", 1
RING_PACKED = 1 << 34


def packed_frontend(sock, mode, queues=1, **kw):
    vdev = virtio_user_vdev(sock, queues=queues, packed_vq=True, **kw.pop("vdev", {}))
    return Testpmd([vdev], forward_mode=mode, cpus=PEER_CPU, huge=False, rxq=queues,
                   txq=queues, nb_cores=1, **kw)


def negotiated(vhu):
    """The virtio features vhu logged for the connection ("virtio features 0x...")."""
    for line in vhu.output().splitlines():
        if "virtio features" in line:
            return int(line.split("virtio features")[1].split()[0], 16)
    raise AssertionError(f"no feature line in:\n{vhu.output()[-2000:]}")


@pytest.mark.parametrize("queues,workers", [(1, 1), (2, 2)])
def test_packed_txonly_into_sink_counts_exactly(tmp_path, queues, workers):
    with VhuMaster(tmp_path, "--app", "sink", "--queues", queues, "--workers", workers,
                   "--cpus", VHU_CPU, "--log-level", "info") as vhu:
        with packed_frontend(vhu.sockets[0], "txonly", queues) as tp:
            tp.wait_link_up(0)
            sent = tp.run_for(2.0)[0]["tx_packets"]
            assert sent > 10_000
            got = vhu.wait_stable("rx_packets")
        assert negotiated(vhu) & RING_PACKED, "packed ring not negotiated"
        assert got == sent, f"vhu counted {got}, testpmd sent {sent}"
        assert vhu.port()["rx_bytes"] == 64 * sent
        if queues > 1:
            assert all(q["rx_packets"] for q in vhu.port()["queues"][:queues])
        vhu.stop()


def test_packed_echo_returns_every_frame(tmp_path):
    with VhuMaster(tmp_path, "--app", "echo", "--cpus", VHU_CPU, "--log-level", "info") as vhu:
        with packed_frontend(vhu.sockets[0], "io") as tp:
            tp.wait_link_up(0)
            stats = tp.run_for(2.0, tx_first=True)[0]
            assert stats["rx_packets"] > 10_000
            assert stats["rx_packets"] - stats["tx_packets"] in range(-64, 65)
            port = tp.port_stats()[0]
            assert port["rx_bytes"] == 64 * port["rx_packets"] and port["rx_errors"] == 0
        assert negotiated(vhu) & RING_PACKED
        assert vhu.wait_stable("tx_packets") == vhu.port()["rx_packets"]
        vhu.stop()


def test_packed_source_reaches_rxonly(tmp_path):
    with VhuMaster(tmp_path, "--app", "source", "--pkt-size", "200", "--cpus", VHU_CPU) as vhu:
        with packed_frontend(vhu.sockets[0], "rxonly") as tp:
            tp.wait_link_up(0)
            tp.run_for(1.5)
            got = tp.port_stats()[0]
        assert got["rx_packets"] > 10_000
        assert got["rx_bytes"] == 200 * got["rx_packets"]
        assert got["rx_errors"] == 0
        assert vhu.wait_stable("tx_packets") >= got["rx_packets"]
        vhu.stop()


def test_packed_frontend_killed_and_restarted(tmp_path):
    """A packed ring's state is the front-end's: after a SIGKILL the next
    virtio-user starts fresh rings (wrap counters at 1) and counts stay exact."""
    with VhuMaster(tmp_path, "--app", "sink", "--cpus", VHU_CPU) as vhu:
        with packed_frontend(vhu.sockets[0], "txonly") as tp:
            tp.wait_link_up(0)
            tp.start()
            time.sleep(1.0)
            tp.kill()
        vhu.wait_log("disconnected")
        first = vhu.wait_stable("rx_packets")
        assert first > 0
        with packed_frontend(vhu.sockets[0], "txonly") as tp:
            tp.wait_link_up(0)
            sent = tp.run_for(1.5)[0]["tx_packets"]
        assert vhu.wait_stable("rx_packets") == first + sent
        assert "Traceback" not in vhu.output()
        vhu.stop()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_in_order_frontend_sink_and_echo(tmp_path, packed):
    """virtio-user in_order=1 negotiates VIRTIO_F_IN_ORDER: DPDK's in-order
    receive path trusts the device to use buffers in order."""
    in_order = 1 << 35
    for app in ("sink", "echo"):
        d = tmp_path / app
        d.mkdir()
        with VhuMaster(d, "--app", app, "--cpus", VHU_CPU, "--log-level", "info") as vhu:
            vdev = virtio_user_vdev(vhu.sockets[0], packed_vq=packed, in_order=True)
            mode = "txonly" if app == "sink" else "io"
            with Testpmd([vdev], forward_mode=mode, cpus=PEER_CPU, huge=False, nb_cores=1) as tp:
                tp.wait_link_up(0)
                stats = tp.run_for(1.5, tx_first=app == "echo")[0]
                port = tp.port_stats()[0]
            assert negotiated(vhu) & in_order
            assert bool(negotiated(vhu) & RING_PACKED) == packed
            if app == "sink":
                assert vhu.wait_stable("rx_packets") == stats["tx_packets"] > 10_000
            else:
                assert stats["rx_packets"] > 10_000 and port["rx_errors"] == 0
                assert port["rx_bytes"] == 64 * port["rx_packets"]
            vhu.stop()
