"""Queue pairs as the front-end asks: --queues is the most a port offers
(default 8, GET_QUEUE_NUM), every queue pair a front-end sets up and enables
is served (the least loaded worker takes it, vhu/placement.py), and the
stats list the queue pairs in use and which worker polls each.

- The README's command, `python -m vhu.master --socket ./vhost.sock
  --workers 4`, against DPDK virtio-user queues=4: vhu's per-queue counts
  equal testpmd's, queue by queue.
- More queue pairs than offered: DPDK is refused at set-up (it probes no
  port) and vhu says so in one warning; QEMU (which checks GET_QUEUE_NUM
  itself and retries at once) costs one warning, not a log flood.
- QEMU `-netdev vhost-user,queues=4` + `mq=on`, `-smp 2`, against
  `--workers 2` and no --queues: the guest's virtio_net uses two queue pairs
  (one per CPU), ping and a TCP transfer (md5) work, vhu's stats show both.
"""
import os
import re
import time

import numpy as np
import pytest

from tests.test_guests import MAC_A, MAC_B, Short, assert_gone, transfer
from tests.test_master_hostile import Frontend
from tests.vhuproc import VhuMaster
from vhu import stats
from vhu._ring import COUNTER_NAMES
from vhu.protocol.messages import ProtocolFeature as PF, Request as R, U64, VringState
from vhu.testbed.dpdk import Testpmd, TestpmdError, virtio_user_vdev
from vhu.testbed.procs import descendants

Testpmd.__test__ = TestpmdError.__test__ = False   # peers, not test classes

VHU_CPU, PEER_CPU = "0", 1
QUEUE_STREAM = re.compile(r"Forward Stats for RX Port= *0/Queue= *(\d+) -> TX Port= *0/Queue= *(\d+)"
                          r" -+\s+RX-packets: *(\d+)\s+TX-packets: *(\d+)\s+TX-dropped: *(\d+)")


def txonly(sock, queues):
    return Testpmd([virtio_user_vdev(sock, queues=queues)], forward_mode="txonly", cpus=PEER_CPU,
                   huge=False, rxq=queues, txq=queues, nb_cores=1)


def per_queue_tx(stop_output):
    """{queue: TX-packets} from testpmd's `stop` (one stream per queue)."""
    return {int(m.group(1)): int(m.group(4)) for m in QUEUE_STREAM.finditer(stop_output)}


def test_stats_list_the_queue_pairs_in_use():
    """8 offered; the port's high-water mark says 2 were enabled; a kick on a
    ring never enabled (queue pair 3) counts in the totals but lists nothing;
    frames counted on queue pair 5 (by an earlier front-end) list up to it."""
    c = {n: i for i, n in enumerate(COUNTER_NAMES)}
    snap = np.zeros((1, 16, len(COUNTER_NAMES)), dtype=np.uint64)
    snap[0, 1, c["tx_frames"]] = 7                 # queue pair 0's TX ring: 7 received
    snap[0, 3, c["tx_frames"]] = 5
    snap[0, 6, c["kicks"]] = 3                     # queue pair 3's RX ring, never enabled
    doc = stats.port_stats(snap, 0, 2, "x.sock", True)
    assert [q["queue"] for q in doc["queues"]] == [0, 1]
    assert doc["rx_packets"] == 12 and doc["kicks"] == 3
    assert [q["queue"] for q in stats.port_stats(snap, 0, 0, "x.sock", False)["queues"]] == [0, 1]
    snap[0, 11, c["rx_no_room"]] = 1               # a drop on queue pair 5
    doc = stats.port_stats(snap, 0, 2, "x.sock", True)
    assert [q["queue"] for q in doc["queues"]] == list(range(6))
    assert doc["drops_by_reason"]["rx_no_room"] == 1
    empty = np.zeros_like(snap)
    assert [q["queue"] for q in stats.port_stats(empty, 0, 0, "x.sock", False)["queues"]] == [0]


@pytest.mark.peers("testpmd")
def test_readme_command_serves_four_dpdk_queue_pairs(tmp_path):
    with VhuMaster(tmp_path, "--workers", 4, "--cpus", VHU_CPU) as vhu:
        with txonly(vhu.sockets[0], 4) as tp:
            tp.wait_link_up(0)
            tp.start()
            time.sleep(2)
            sent = per_queue_tx(tp.cmd("stop", timeout=30))
            # Four workers, one queue pair each (the least loaded takes the
            # next), while testpmd is still connected.
            placed = [q.get("worker") for q in vhu.port()["queues"]]
            assert sorted(placed) == [0, 1, 2, 3], placed
        assert sorted(sent) == [0, 1, 2, 3] and all(sent.values()), sent
        assert vhu.wait_stable("rx_packets") == sum(sent.values())
        qs = vhu.port()["queues"]
        assert {q["queue"]: q["rx_packets"] for q in qs} == sent     # queue by queue, exactly
        assert len(descendants(vhu.proc.pid)) >= 4
        assert "refused" not in vhu.output()
        vhu.stop()


@pytest.mark.peers("testpmd")
def test_dpdk_with_more_queue_pairs_than_offered_is_refused_at_setup(tmp_path):
    with VhuMaster(tmp_path, "--queues", 2, "--cpus", VHU_CPU) as vhu:
        with pytest.raises(TestpmdError) as failed:
            txonly(vhu.sockets[0], 4).launch()
        # DPDK gets the failure at its acknowledged SET_STATUS and probes no port.
        assert "No probed ethernet devices" in str(failed.value), str(failed.value)
        vhu.wait_log("disconnected")
        out = vhu.output()
        warnings = [ln for ln in out.splitlines() if " WARNING " in ln]
        assert len(warnings) == 1, warnings
        assert "ring index 4 out of range (0..3): queue pair 2 asked for, 2 offered" in warnings[0]
        assert " started (" not in out, "a ring was started for a refused front-end"
        # The port is unharmed: two queue pairs are served, exactly.
        with txonly(vhu.sockets[0], 2) as tp:
            tp.wait_link_up(0)
            tp.start()
            time.sleep(1)
            sent = per_queue_tx(tp.cmd("stop", timeout=30))
        assert sorted(sent) == [0, 1] and all(sent.values()), sent
        assert vhu.wait_stable("rx_packets") == sum(sent.values())
        assert {q["queue"]: q["rx_packets"] for q in vhu.port()["queues"]} == sent
        vhu.stop()


def qemu_wanting_more_queues(path):
    """What QEMU 7.2 sends, as traced, before "you are asking more queues than
    supported": then it closes the connection (and connects again)."""
    fe = Frontend(path)
    try:
        fe.call(R.GET_FEATURES)
        proto = U64.STRUCT.unpack(fe.call(R.GET_PROTOCOL_FEATURES))[0]
        fe.send(R.SET_PROTOCOL_FEATURES, U64(proto).pack())
        offered = U64.STRUCT.unpack(fe.call(R.GET_QUEUE_NUM))[0]
        fe.call(R.GET_MAX_MEM_SLOTS)
        assert proto & (1 << PF.REPLY_ACK)
        r, w = os.pipe()
        try:
            assert fe.ack(R.SET_BACKEND_REQ_FD, fds=[r]) == 0
        finally:
            os.close(r)
            os.close(w)
        fe.send(R.SET_OWNER)
        fe.call(R.GET_FEATURES)
        for ring in (0, 1):
            for req in (R.SET_VRING_CALL, R.SET_VRING_ERR):
                efd = os.eventfd(0, os.EFD_CLOEXEC)
                fe.send(req, U64(ring).pack(), fds=[efd])
                os.close(efd)
        fe.call(R.GET_FEATURES)               # all handled
        return offered
    finally:
        fe.close()


def test_front_end_leaving_after_queue_num_is_said_once_and_slowed(tmp_path):
    """QEMU's retry loop without QEMU: six sessions that leave after
    GET_QUEUE_NUM. One warning, the reconnects served after a doubling pause
    (0.1 + 0.2 + 0.4 + 0.8 + 1.6 s), logged at DEBUG; a front-end that goes on
    is served, and when it leaves the count of those before it is said."""
    with VhuMaster(tmp_path, "--queues", 2) as vhu:
        t0 = time.monotonic()
        assert [qemu_wanting_more_queues(vhu.sockets[0]) for _ in range(6)] == [2] * 6
        took = time.monotonic() - t0
        fe = Frontend(vhu.sockets[0]).negotiate()
        try:
            assert fe.ack(R.SET_VRING_NUM, VringState(0, 256).pack()) == 0
        finally:
            fe.close()
        vhu.wait_log("6 front-ends in a row had left after GET_QUEUE_NUM")
        out = vhu.output()
        vhu.stop()
    warnings = [ln for ln in out.splitlines() if " WARNING " in ln]
    assert len(warnings) == 1 and "left right after asking how many queue pairs this port " \
        "offers (2): it wants more" in warnings[0], warnings
    # INFO: the first connection only; while they keep leaving, connections are DEBUG
    assert out.count("front-end connected") == 1, out
    assert took >= 3.0, took


class QueuesPair:
    """Two guests with queues=4 and -smp 2, joined by --app patch, --workers 2."""

    def __init__(self, vhu_args):
        from vhu.testbed.guest import Guest
        self.dir = Short()
        self.vhu = VhuMaster(self.dir, "--app", "patch", "--cpus", VHU_CPU, *vhu_args,
                             sockets=("a.sock", "b.sock"))
        self.guests = []
        try:
            self.vhu.wait_sockets()
            for name, ip, mac in (("a", "10.0.0.1/24", MAC_A), ("b", "10.0.0.2/24", MAC_B)):
                self.guests.append(Guest(self.dir / f"{name}.sock", ip=ip, mac=mac, queues=4,
                                         smp=2, cpu=PEER_CPU, name=f"vhu-mq-{name}",
                                         log_path=self.dir / f"{name}.console").launch())
            for g in self.guests:
                g.wait_ready(120)
        except BaseException:
            self.close(check=False)
            raise

    def close(self, check=True):
        """check: the balance check and exit status 0 (not after a failure)."""
        for g in self.guests:
            g.close()
        pids = descendants(self.vhu.proc.pid)
        self.vhu.stop(check=check)
        assert_gone(pids)
        self.dir.remove()


@pytest.mark.peers("qemu")
def test_qemu_four_queues_two_cpus_uses_two_queue_pairs():
    p, served = QueuesPair(["--workers", 2]), False
    try:
        a, b = p.guests
        for g in (a, b):
            out, _ = g.run("ls /sys/class/net/eth0/queues/")
            assert out.split() == ["rx-0", "rx-1", "tx-0", "tx-1"], out   # min(4 queues, 2 CPUs)
        for g, dst in ((a, "10.0.0.2"), (b, "10.0.0.1")):
            for cpu in (0, 1):                 # XPS: CPU i sends on queue i
                out, rc = g.run(f"taskset -c {cpu} ping -c 5 -i 0.2 {dst}", timeout=30)
                assert rc == 0 and ", 0% packet loss" in out, out
        assert transfer(a, b, "10.0.0.2") == 4 << 20
        for port in (0, 1):
            p.vhu.wait_stable("rx_packets", port=port, settle=0.5)
            qs = p.vhu.port(port)["queues"]
            # QEMU sets up its four queue pairs; the guest enables two: the stats list two.
            assert [q["queue"] for q in qs] == [0, 1], qs
            assert all(q["rx_packets"] > 0 and q["tx_packets"] > 0 for q in qs), qs
            assert not p.vhu.port(port)["broken"]
        out = p.vhu.output()
        assert " WARNING " not in out and "refused" not in out, out[-3000:]
        served = True
    finally:
        p.close(check=served)


@pytest.mark.peers("qemu")
def test_qemu_with_more_queues_than_offered_costs_one_warning(tmp_path):
    """QEMU refuses to start the device itself ("you are asking more queues
    than supported: 2") and connects again at once, forever: vhu says why
    once, logs the retries at DEBUG and slows them down (accepting at most
    every 2 s), so neither log floods."""
    from vhu.testbed.guest import Guest
    d = Short()
    try:
        with VhuMaster(d, "--queues", 2, "--cpus", VHU_CPU) as vhu:
            g = Guest(vhu.sockets[0], queues=4, smp=2, cpu=PEER_CPU, name="vhu-mq-refused")
            g.launch()
            try:
                deadline = time.monotonic() + 60
                while g.stderr.count("you are asking more queues than supported: 2") < 5:
                    assert time.monotonic() < deadline and g.alive(), g.stderr[-2000:]
                    time.sleep(0.2)
                time.sleep(5)
                retries = g.stderr.count("you are asking more queues than supported: 2")
            finally:
                g.close()
            out = vhu.output()
            vhu.stop()
        warnings = [ln for ln in out.splitlines() if " WARNING " in ln]
        assert len(warnings) == 1 and "it wants more" in warnings[0], warnings
        assert out.count("front-end connected") == 1, out[-3000:]
        # Without the pause QEMU retried ~700 times a second (26 MB of vhu log in 2 minutes).
        assert retries < 30, retries
    finally:
        d.remove()
