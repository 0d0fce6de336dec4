"""vhu.workers.Forwarder embedded in this test process, DPDK testpmd as the
front-ends: a sender (io + tx_first: exactly one burst of 32 frames per
start) on port 0 and a receiver (rxonly, verbose: it prints every frame's
MACs and EtherType) on port 1. Python stages run in the worker processes,
so they live at module level here (workers import them by module path).
"""
import os
import re
import time

import numpy as np
import pytest

from vhu.testbed.dpdk import Testpmd, virtio_user_vdev
from vhu.workers import APP, DROP, Forwarder, VhostUserPort

Testpmd.__test__ = False

pytestmark = pytest.mark.peers("testpmd")
NEW_DST = "02:aa:bb:cc:dd:ee"
BURST = 32


def rewrite_dst(batch):
    """Every frame's destination MAC becomes NEW_DST, in guest memory."""
    new = np.frombuffer(bytes.fromhex(NEW_DST.replace(":", "")), dtype=np.uint8)
    for i in range(len(batch)):
        batch.frame(i)[:6] = new
    return None


def drop_ipv4(batch):
    return np.where(batch.ethertype == 0x0800, DROP, APP)


_seen = [0]


def fail_first_burst(batch):
    """Raises on every batch until BURST frames have been seen, then passes."""
    before = _seen[0]
    _seen[0] += len(batch)
    if before < BURST:
        raise RuntimeError("stage failure on purpose")
    return np.full(len(batch), 1)        # explicit verdict: port 1


class Rig:
    """Port 0 (a.sock) is served, port 1 (b.sock) too, or with client=True
    vhu connects to the receiver's socket (virtio-user server=1)."""

    def __init__(self, tmp_path, pipeline, client=False, packed=False):
        b = str(tmp_path / "b.sock")
        self.fw = Forwarder([tmp_path / "a.sock", VhostUserPort(b, client=client)],
                            pipeline=pipeline, cpus=(0,), stats_interval=0.2)
        self.fw.start()       # client: vhu retries until the receiver listens
        self.tx = Testpmd([virtio_user_vdev(str(tmp_path / "a.sock"), packed_vq=packed)],
                          forward_mode="io", cpus=1, huge=False).launch()
        self.rx = Testpmd([virtio_user_vdev(b, server=client, packed_vq=packed)],
                          forward_mode="rxonly", cpus=1, huge=False).launch()
        self.tx.wait_link_up(0)
        self.rx.wait_link_up(0)
        self.rx.cmd("set verbose 1")
        self.rx.start()

    def burst(self):
        self.tx.run_for(0.3, tx_first=True)

    def received(self, n, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frames = re.findall(r"src=([0-9A-Fa-f:]+) - dst=([0-9A-Fa-f:]+) .*?type=(0x[0-9a-fA-F]+)",
                                self.rx.output)
            if len(frames) >= n:
                break
            time.sleep(0.1)
        time.sleep(0.3)     # and nothing more arrives
        return re.findall(r"src=([0-9A-Fa-f:]+) - dst=([0-9A-Fa-f:]+) .*?type=(0x[0-9a-fA-F]+)",
                          self.rx.output)

    def port(self, i, timeout=5):
        return self.fw.stats()[i]

    def close(self):
        for tp in (self.tx, self.rx):
            tp.close()
        self.fw.stop()


@pytest.fixture
def rig(tmp_path):
    rigs = []

    def make(pipeline, client=False, packed=False):
        rigs.append(Rig(tmp_path, pipeline, client, packed))
        return rigs[-1]
    yield make
    for r in rigs:
        r.close()
    assert not os.path.exists(tmp_path / "a.sock"), "socket files removed on stop"


@pytest.mark.parametrize("client,packed", [(False, False), (True, False), (False, True)],
                         ids=["server", "client", "packed"])
def test_stage_rewrites_destination_mac_seen_by_receiver(rig, client, packed):
    r = rig([rewrite_dst, "patch"], client, packed)
    r.burst()
    got = r.received(BURST)
    assert len(got) == BURST
    assert {dst.lower() for _, dst, _ in got} == {NEW_DST}
    assert r.port(0)["rx_packets"] == BURST and r.port(1)["tx_packets"] == BURST


def test_ethertype_drop_stage(rig):
    r = rig([drop_ipv4, "patch"])
    r.burst()
    assert r.received(1, timeout=2) == []
    p0 = r.port(0)
    assert p0["rx_packets"] == BURST
    assert p0["drops_by_reason"]["stage"] == BURST
    assert r.port(1)["tx_packets"] == 0


def test_raising_stage_is_reported_and_worker_keeps_running(rig, capfd):
    r = rig([fail_first_burst])           # no built-in app: verdicts route by themselves
    r.burst()
    deadline = time.monotonic() + 10
    while r.port(0)["drops_by_reason"].get("stage_error", 0) < BURST and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.port(0)["drops_by_reason"]["stage_error"] == BURST
    r.burst()
    assert len(r.received(BURST)) == BURST
    assert r.port(1)["tx_packets"] == BURST
    err = capfd.readouterr()
    text = err.out + err.err
    assert "stage failure on purpose" in text and "Traceback" in text
    assert r.fw.running


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                    reason="needs root and /dev/net/tun")
def test_tap_device_port_counts_match_the_kernel(tmp_path):
    """Forwarder([socket, TapDevice]) patched: every frame testpmd sends is
    written to the TAP (the kernel counts it as received on the interface)
    or counted as a drop."""
    import subprocess
    from vhu.workers import TapDevice
    name = f"vhuf{os.getpid() % 100000}"
    sock = str(tmp_path / "a.sock")
    with Forwarder([sock, TapDevice(name)], pipeline=["patch"], cpus=(0,),
                   stats_interval=0.2) as fw:
        subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"], check=False)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)

        def kernel_rx():
            with open(f"/sys/class/net/{name}/statistics/rx_packets") as f:
                return int(f.read())
        before = kernel_rx()
        with Testpmd([virtio_user_vdev(sock)], forward_mode="txonly", cpus=1, huge=False) as tp:
            tp.wait_link_up(0)
            sent = tp.run_for(0.3)[0]["tx_packets"]
        deadline = time.monotonic() + 10
        while fw.stats()[0]["rx_packets"] < sent and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        sock_port, tap_port = fw.stats()
        assert tap_port["socket"] == f"tap:{name}" and tap_port["connected"]
        assert sock_port["rx_packets"] == sent > 1000
        assert tap_port["tx_packets"] + tap_port["drops_by_reason"]["rx_no_room"] == sent
        assert kernel_rx() - before == tap_port["tx_packets"] > 0
    assert not os.path.exists(f"/sys/class/net/{name}"), "the TAP goes with the Forwarder"
