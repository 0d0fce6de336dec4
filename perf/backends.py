"""Back-ends and a front-end for the performance suite, pinned the same way.

Each back-end serves one vhost-user socket on BACKEND_CPU; the front-end is
DPDK's virtio-user in testpmd on PEER_CPU (or vhu.frontend). Rates are read
at the front-end, so every back-end is measured by the same instrument.
"""
import os
import signal
import subprocess
import sys
import time

from vhu.testbed.dpdk import Testpmd, vhost_vdev, virtio_user_vdev
from vhu.testbed.procs import process_tree

Testpmd.__test__ = False
BACKEND_CPU, PEER_CPU = 0, 1
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A row: what the back-end does, what the front-end does, which front-end
# counter is the rate (the front-end's TX is what the back-end drained).
ROWS = {
    "sink":   {"dpdk": "rxonly", "frontend": "txonly", "count": "tx_packets"},
    "source": {"dpdk": "txonly", "frontend": "rxonly", "count": "rx_packets"},
    "echo":   {"dpdk": "macswap", "frontend": "io", "count": "rx_packets", "tx_first": True},
}


def cpu_seconds(pids):
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return total


def peak_rss_kib(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


class DpdkBackend:
    name = "dpdk"

    def __init__(self, sock, row, pkt_size, queues=1):
        self.tp = Testpmd([vhost_vdev(sock, queues=queues)], forward_mode=ROWS[row]["dpdk"],
                          cpus=BACKEND_CPU, huge=False, txpkts=pkt_size, rxq=queues, txq=queues,
                          nb_cores=1)

    def __enter__(self):
        self.tp.launch()
        return self

    def ready(self):
        self.tp.wait_link_up(0, timeout=20)
        self.tp.start()

    def pids(self):
        return process_tree(self.tp.pid)

    def __exit__(self, *exc):
        self.tp.close()


class VhuBackend:
    """python -m vhu.master, from this checkout or (tree) another one built
    in place (a baseline to compare a change against, in the same run)."""
    name = "vhu"

    def __init__(self, sock, row, pkt_size, queues=1, workers=1, poll="busy", tree=None):
        self.sock = sock
        self.tree = tree
        self.argv = [sys.executable, "-m", "vhu.master", "--socket", sock, "--app", row,
                     "--pkt-size", str(pkt_size), "--queues", str(queues),
                     "--workers", str(workers), "--poll", poll,
                     "--cpus", str(BACKEND_CPU), "--stats-interval", "5", "--log-level", "WARNING"]
        self.proc = None

    def __enter__(self):
        env = dict(os.environ, PYTHONPATH=self.tree) if self.tree else None
        self.proc = subprocess.Popen(self.argv, cwd=self.tree or REPO, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vhu.master did not start ({self.proc.returncode})")
            time.sleep(0.05)
        return self

    def ready(self):
        pass

    def pids(self):
        return process_tree(self.proc.pid)

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def measure(backend, sock, row, pkt_size, seconds=3.0, warmup=1.0, queues=1, packed=False):
    """Run one row; returns dict(mpps, cpu_ns_per_pkt, rss_mib, packets).
    packed: the front-end asks for packed virtqueues (both back-ends offer them)."""
    spec = ROWS[row]
    with backend:
        fe = Testpmd([virtio_user_vdev(sock, queues=queues, packed_vq=packed)], forward_mode=spec["frontend"],
                     cpus=PEER_CPU, huge=False, txpkts=pkt_size, rxq=queues, txq=queues,
                     nb_cores=1)
        with fe:
            fe.wait_link_up(0, timeout=20)
            backend.ready()
            fe.start(tx_first=spec.get("tx_first", False))
            time.sleep(warmup)
            pids = backend.pids()
            s0, c0, t0 = fe.port_stats()[0], cpu_seconds(pids), time.monotonic()
            time.sleep(seconds)
            s1, c1, t1 = fe.port_stats()[0], cpu_seconds(pids), time.monotonic()
            rss = peak_rss_kib(pids)
            fe.stop()
    packets = s1[spec["count"]] - s0[spec["count"]]
    dt = t1 - t0
    return {"mpps": packets / dt / 1e6, "packets": packets, "seconds": dt,
            "cpu_ns_per_pkt": (c1 - c0) / packets * 1e9 if packets else None,
            "rss_mib": rss / 1024}
