"""vhu.master against DPDK 22.11 testpmd as the front-end (virtio-user).

Needs dpdk-testpmd (scripts/setup-peers.sh). Missing: skipped with the reason,
or failed under CI=true. testpmd runs on CPU 1, vhu's workers on CPU 0.
"""
import os
import time

import pytest

from tests.vhuproc import VhuMaster
from vhu.testbed.dpdk import Testpmd, virtio_user_vdev

Testpmd.__test__ = False   # a peer, not a test class

pytestmark = pytest.mark.peers("testpmd")
VHU_CPU, PEER_CPU = "0", 1


def frontend(sock, mode, queues=1, **kw):
    return Testpmd([virtio_user_vdev(sock, queues=queues, server=kw.pop("server", False))],
                   forward_mode=mode, cpus=PEER_CPU, huge=kw.pop("huge", False), rxq=queues,
                   txq=queues, nb_cores=1, **kw)


@pytest.mark.parametrize("queues,workers", [(1, 1), (4, 4)])
def test_txonly_into_sink_counts_exactly(tmp_path, queues, workers):
    with VhuMaster(tmp_path, "--app", "sink", "--queues", queues, "--workers", workers,
                   "--cpus", VHU_CPU) as vhu:
        with frontend(vhu.sockets[0], "txonly", queues) as tp:
            tp.wait_link_up(0)
            sent = tp.run_for(2.0)[0]["tx_packets"]
            assert sent > 10_000
            got = vhu.wait_stable("rx_packets")
        assert got == sent, f"vhu counted {got}, testpmd sent {sent}"
        assert vhu.port()["rx_bytes"] == 64 * sent
        if queues > 1:
            busy = [q for q in vhu.port()["queues"] if q["rx_packets"]]
            assert len(busy) == queues, "every queue pair carried traffic"
        vhu.stop()


def test_memory_table_changes_while_rings_run_lose_nothing(tmp_path):
    """On hugepages, virtio-user sends SET_MEM_TABLE again as its memory
    grows, while rings run: workers remap between batches; counts stay exact."""
    from vhu.testbed.dpdk import hugepages_usable
    if not hugepages_usable():
        pytest.skip("no free hugepages (scripts/setup-peers.sh sets 512)")
    with VhuMaster(tmp_path, "--app", "sink", "--queues", 2, "--workers", 2,
                   "--cpus", VHU_CPU) as vhu:
        with frontend(vhu.sockets[0], "txonly", 2, huge=True) as tp:
            tp.wait_link_up(0)
            sent = tp.run_for(2.0)[0]["tx_packets"]
            got = vhu.wait_stable("rx_packets")
        assert vhu.output().count("memory table:") >= 2, "expected tables sent while running"
        assert got == sent > 10_000
        vhu.stop()


def test_echo_returns_frames_unchanged(tmp_path):
    with VhuMaster(tmp_path, "--app", "echo", "--cpus", VHU_CPU) as vhu:
        with frontend(vhu.sockets[0], "io") as tp:
            tp.wait_link_up(0)
            stats = tp.run_for(2.0, tx_first=True)[0]
            # io + tx_first: one burst of 64-byte frames circulates through vhu and back.
            assert stats["rx_packets"] > 10_000
            assert stats["rx_packets"] - stats["tx_packets"] in range(-64, 65)
            # Look at frames coming back: same headers and length as testpmd sent.
            tp.set_mode("rxonly")
            tp.cmd("set verbose 1")
            out = tp.cmd("start tx_first")
            time.sleep(0.5)
            out = tp.cmd("stop") + tp.output[-20000:]
        received = [ln for ln in out.splitlines() if "length=64" in ln and "type=0x0800" in ln]
        assert received, out[-3000:]
        assert all("L3_IPV4" in ln and "L4_UDP" in ln for ln in received)
        vhu.stop()


def test_source_reaches_rxonly(tmp_path):
    with VhuMaster(tmp_path, "--app", "source", "--pkt-size", "128", "--cpus", VHU_CPU) as vhu:
        with frontend(vhu.sockets[0], "rxonly") as tp:
            tp.wait_link_up(0)
            tp.run_for(1.5)
            got = tp.port_stats()[0]
        assert got["rx_packets"] > 10_000
        assert got["rx_bytes"] == 128 * got["rx_packets"]
        assert got["rx_errors"] == 0
        # Frames vhu put into the ring that testpmd had not read when it stopped
        # count on vhu's side only.
        assert vhu.wait_stable("tx_packets") >= got["rx_packets"]
        vhu.stop()


def test_frontend_killed_and_restarted(tmp_path):
    with VhuMaster(tmp_path, "--app", "sink", "--cpus", VHU_CPU) as vhu:
        with frontend(vhu.sockets[0], "txonly") as tp:
            tp.wait_link_up(0)
            tp.start()
            time.sleep(1.0)
            tp.kill()
        vhu.wait_log("disconnected")
        first = vhu.wait_stable("rx_packets")
        assert first > 0
        with frontend(vhu.sockets[0], "txonly") as tp:
            tp.wait_link_up(0)
            sent = tp.run_for(1.5)[0]["tx_packets"]
        assert vhu.wait_stable("rx_packets") == first + sent
        assert "Traceback" not in vhu.output()
        vhu.stop()


def test_client_mode_against_virtio_user_server(tmp_path):
    """vhu --client connects (with backoff) to a listening virtio-user, and
    reconnects when that front-end is killed and started again."""
    sock = str(tmp_path / "vhost.sock")
    with VhuMaster(tmp_path, "--client", "--app", "sink", "--cpus", VHU_CPU) as vhu:
        total = 0
        for round_ in range(2):
            with frontend(sock, "txonly", server=True) as tp:
                vhu.wait_log("front-end connected", count=round_ + 1)
                tp.wait_link_up(0)
                sent = tp.run_for(1.0)[0]["tx_packets"]
                assert sent > 10_000
                total += sent
                assert vhu.wait_stable("rx_packets") == total
                if round_ == 0:
                    tp.kill()
            vhu.wait_log("disconnected", count=round_ + 1)
            if os.path.exists(sock):
                os.unlink(sock)      # a killed virtio-user server leaves its socket file
        vhu.stop()


@pytest.mark.parametrize("poll", ["adaptive", "epoll"])
def test_idle_worker_sleeps(tmp_path, poll):
    """With a front-end attached but no traffic, a worker uses < 1% of a core;
    traffic then flows at once (the kick wakes it)."""
    from perf.backends import cpu_seconds
    from vhu.testbed.procs import descendants
    with VhuMaster(tmp_path, "--app", "sink", "--poll", poll, "--cpus", VHU_CPU) as vhu:
        with frontend(vhu.sockets[0], "txonly") as tp:
            tp.wait_link_up(0)
            time.sleep(1.0)                          # past the adaptive spin phase
            workers = descendants(vhu.proc.pid)
            assert workers
            c0, t0 = cpu_seconds(workers), time.monotonic()
            time.sleep(3.0)
            share = (cpu_seconds(workers) - c0) / (time.monotonic() - t0)
            assert share < 0.01, f"idle worker used {share:.1%} of a core"
            sent = tp.run_for(1.0)[0]["tx_packets"]
            assert sent > 10_000
        assert vhu.wait_stable("rx_packets") == sent
        vhu.stop()
