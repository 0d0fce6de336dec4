"""Back-ends and a front-end for the performance suite, pinned the same way.

Each back-end serves one vhost-user socket on BACKEND_CPU; the front-end is
DPDK's virtio-user in testpmd on PEER_CPU (or vhu.frontend). Rates are read
at the front-end, so every back-end is measured by the same instrument.
"""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from vhu.testbed.dpdk import Testpmd, vhost_vdev, virtio_user_vdev
from vhu.testbed.ovs import Ovs
from vhu.testbed.procs import process_tree
from vhu import ctl
from vhu.config import default_control_path

Testpmd.__test__ = False
BACKEND_CPU, PEER_CPU = 0, 1          # the default pinning: one core each side

# Where each side runs: CPU lists (perf/race.py --cpus BACKEND:PEER sets
# them; the default is one core each). vhu's workers go round-robin over the
# back-end list, as `vhu.master --cpus` places them; a testpmd puts its main
# lcore (idle while forwarding) on the list's first CPU and one forwarding
# lcore per queue pair round-robin over the others (over the first when it
# is alone), so with a list of 1 + Q CPUs every queue pair has a core.
PINNING = {"backend": (BACKEND_CPU,), "peer": (PEER_CPU,)}


def pin(backend_cpus, peer_cpus):
    """Run the back-ends on backend_cpus and the front-end on peer_cpus."""
    if set(backend_cpus) & set(peer_cpus):
        raise ValueError(f"back-end CPUs {backend_cpus} and front-end CPUs {peer_cpus} overlap")
    PINNING["backend"], PINNING["peer"] = tuple(backend_cpus), tuple(peer_cpus)


def testpmd_cores(side, queues):
    """(cpus, nb_cores) for a testpmd on one side's CPU list."""
    cpus = list(PINNING[side])
    return cpus, max(1, min(queues, len(cpus) - 1))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A row: what the back-end does, what the front-end does, which front-end
# counter is the rate (the front-end's TX is what the back-end drained).
ROWS = {
    "sink":   {"dpdk": "rxonly", "frontend": "txonly", "count": "tx_packets"},
    "source": {"dpdk": "txonly", "frontend": "rxonly", "count": "rx_packets"},
    "echo":   {"dpdk": "macswap", "frontend": "io", "count": "rx_packets", "tx_first": True},
}

# Two-port rows: one testpmd with two virtio-user ports bounces unicast
# frames through the back-end (mac forwarding, each port's peer MAC the
# other port's), so every frame crosses the back-end's switch (or patch)
# and the rate is the total RX of both testpmd ports. The peer back-end is
# Open vSwitch-DPDK: the NORMAL action for switch, two port-to-port flows
# for patch.
SWITCH_ROWS = ("switch", "patch")
SWITCH_MACS = ("02:00:00:00:00:01", "02:00:00:00:00:02")


# Which side bounds a row: each side's busy share over the measured window,
# the part of its polling time spent in iterations that moved packets. All
# three count it the same way (an iteration that polled empty rings is idle):
# vhu's workers in ticks (vhu.ctl show), OVS's PMD in cycles (pmd-stats-show),
# testpmd's forwarding cores in TSC cycles (--record-core-cycles; its total
# is the window's wall time). A side near 1.0 is the bound; the other waits.
# testpmd 22.11 calls them "total cycles", but counts only bursts that
# received something (its forwarding functions return before the count on
# an empty burst; 23.03 renamed them "busy cycles").
TESTPMD_BUSY = re.compile(r"(?:total|busy) cycles=(\d+) / total \S+ packets=\d+\) at (\d+) MHz")


class TestpmdBusy:
    """A testpmd's forwarding cores' busy share (it needs --record-core-cycles)."""

    def __init__(self, tp, cores):
        self.tp, self.cores = tp, cores

    def _cycles(self):
        m = TESTPMD_BUSY.search(self.tp.cmd("show fwd stats all"))
        return (int(m.group(1)), int(m.group(2)) * 1e6) if m else (None, None)

    def begin(self):
        self.c0, _ = self._cycles()
        self.t0 = time.monotonic()

    def end(self):
        c1, hz = self._cycles()
        dt = time.monotonic() - self.t0
        if self.c0 is None or c1 is None or dt <= 0:
            return None
        return round((c1 - self.c0) / (dt * hz * self.cores), 3)


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
        cpus, nb_cores = testpmd_cores("backend", queues)
        self.tp = Testpmd([vhost_vdev(sock, queues=queues)], forward_mode=ROWS[row]["dpdk"],
                          cpus=cpus, huge=False, txpkts=pkt_size, rxq=queues, txq=queues,
                          nb_cores=nb_cores, extra_args=["--record-core-cycles"])
        self.busy = TestpmdBusy(self.tp, nb_cores)

    def __enter__(self):
        self.tp.launch()
        return self

    def ready(self):
        self.tp.wait_link_up(0, timeout=20)
        self.tp.start()

    def pids(self):
        return process_tree(self.tp.pid)

    def busy_begin(self):
        self.busy.begin()

    def busy_end(self):
        return self.busy.end()

    def __exit__(self, *exc):
        self.tp.close()


class VhuBackend:
    """python -m vhu.master, from this checkout or (tree) another one built
    in place (a baseline to compare a change against, in the same run)."""
    name = "vhu"

    def __init__(self, sock, row, pkt_size, queues=1, workers=1, poll="busy", tree=None,
                 more_sockets=()):
        self.sock = sock
        self.sockets = (sock, *more_sockets)
        self.tree = tree
        more = [arg for s in more_sockets for arg in ("--socket", s)]
        self.argv = [sys.executable, "-m", "vhu.master", "--socket", sock, *more, "--app", row,
                     "--pkt-size", str(pkt_size), "--queues", str(queues),
                     "--workers", str(workers), "--poll", poll,
                     "--cpus", ",".join(map(str, PINNING["backend"])), "--stats-interval", "5", "--log-level", "WARNING"]
        self.proc = None

    def __enter__(self):
        env = dict(os.environ, PYTHONPATH=self.tree) if self.tree else None
        # The master's warnings and errors go with a failed run.
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.argv, cwd=self.tree or REPO, env=env,
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 20
        # Every socket, not only the first: a front-end that finds one
        # missing fails that port.
        while not all(os.path.exists(s) for s in self.sockets):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = RuntimeError(f"vhu.master did not start ({self.proc.returncode})")
                self.__exit__(RuntimeError, err, None)
                raise err
            time.sleep(0.05)
        return self

    def ready(self):
        pass

    def pids(self):
        return process_tree(self.proc.pid)

    def _ticks(self):
        """(polling ticks, busy ticks) over the workers, live from the
        master's control socket; None from a build that has no such counters."""
        try:
            workers = ctl.ask(default_control_path(self.sock), {"cmd": "show"})["result"]["workers"]
            return (sum(w["poll_ticks"] for w in workers), sum(w["busy_ticks"] for w in workers))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def busy_begin(self):
        self.t0 = self._ticks()

    def busy_end(self):
        t1 = self._ticks()
        if self.t0 is None or t1 is None or t1[0] <= self.t0[0]:
            return None
        return round((t1[1] - self.t0[1]) / (t1[0] - self.t0[0]), 3)

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")
        self.log.close()
        if isinstance(exc[1], BaseException):
            exc[1].add_note("vhu.master said:\n" + "\n".join(text.splitlines()[-40:]))


class OvsBackend:
    """Open vSwitch with DPDK (vhu.testbed.ovs) on BACKEND_CPU: a netdev
    bridge with two dpdkvhostuser ports (OVS listens; their sockets are in its
    run directory), the NORMAL action (MAC learning) for the switch row, two
    port-to-port flows for patch."""
    name = "ovs"

    def __init__(self, row):
        self.row = row
        self.ovs = None
        self.sockets = []

    def __enter__(self):
        cpu = PINNING["backend"][0]          # one queue pair: one PMD
        self.ovs = Ovs(pmd_cpu=cpu, main_cpu=cpu)
        try:
            self.ovs.start()
            self.ovs.add_bridge("br0")
            self.sockets = [self.ovs.add_vhost_user_port("br0", f"vh{i}") for i in (0, 1)]
            # The port exists in the database before ovs-vswitchd listens on
            # its socket; a front-end that comes too early is refused.
            deadline = time.monotonic() + 20
            while not all(os.path.exists(s) for s in self.sockets):
                if time.monotonic() > deadline or not self.ovs.alive():
                    raise RuntimeError(f"OVS never listened on {self.sockets}")
                time.sleep(0.05)
            if self.row == "patch":
                self.ovs.connect_ports("br0", "vh0", "vh1")
            else:
                self.ovs.set_flows("br0", ["actions=NORMAL"])
        except BaseException:
            self.ovs.stop()
            raise
        return self

    def ready(self):
        for name in ("vh0", "vh1"):
            self.ovs.wait_link_up(name)

    def pids(self):
        return [p for proc in (self.ovs.vswitchd, self.ovs.ovsdb) if proc
                for p in process_tree(proc.pid)]

    def busy_begin(self):
        self.ovs.appctl("dpif-netdev/pmd-stats-clear")

    def busy_end(self):
        """The PMD's processing cycles over idle + processing, since busy_begin."""
        out = self.ovs.appctl("dpif-netdev/pmd-stats-show")
        idle = re.search(r"idle cycles:\s*(\d+)", out)
        work = re.search(r"processing cycles:\s*(\d+)", out)
        if not idle or not work or int(idle.group(1)) + int(work.group(1)) == 0:
            return None
        return round(int(work.group(1)) / (int(idle.group(1)) + int(work.group(1))), 3)

    def __exit__(self, *exc):
        if isinstance(exc[1], BaseException):   # what OVS said goes with the failure
            exc[1].add_note("ovs-vswitchd said:\n" + "\n".join(self.ovs.log_text().splitlines()[-40:]))
        self.ovs.stop()


def measure_two_ports(backend, sockets, pkt_size, seconds=3.0, warmup=1.0, packed=False):
    """A SWITCH_ROWS row: testpmd's two virtio-user ports on sockets (the
    back-end already serving them), mac forwarding toward each other, started
    with a first burst; the rate is both ports' RX."""
    with backend:
        socks = sockets or backend.sockets
        vdevs = [virtio_user_vdev(s, i, packed_vq=packed, mac=SWITCH_MACS[i])
                 for i, s in enumerate(socks)]
        peers = [f"--eth-peer={i},{SWITCH_MACS[1 - i]}" for i in (0, 1)]
        fe = Testpmd(vdevs, forward_mode="mac", cpus=PINNING["peer"][0], huge=False,
                     txpkts=pkt_size, nb_cores=1, extra_args=peers + ["--record-core-cycles"])
        fe_busy = TestpmdBusy(fe, 1)
        with fe:
            fe.wait_link_up(0, timeout=20)
            fe.wait_link_up(1, timeout=20)
            backend.ready()
            fe.start(tx_first=True)
            time.sleep(warmup)
            pids = backend.pids()
            backend.busy_begin()
            fe_busy.begin()
            s0, c0, t0 = fe.port_stats(), cpu_seconds(pids), time.monotonic()
            time.sleep(seconds)
            s1, c1, t1 = fe.port_stats(), cpu_seconds(pids), time.monotonic()
            busy = {"backend": backend.busy_end(), "frontend": fe_busy.end()}
            rss = peak_rss_kib(pids)
            fe.stop()
    packets = sum(s1[p]["rx_packets"] - s0[p]["rx_packets"] for p in (0, 1))
    dt = t1 - t0
    return {"mpps": packets / dt / 1e6, "packets": packets, "seconds": dt,
            "cpu_ns_per_pkt": (c1 - c0) / packets * 1e9 if packets else None,
            "rss_mib": rss / 1024, "busy": busy}


def measure(backend, sock, row, pkt_size, seconds=3.0, warmup=1.0, queues=1, packed=False):
    """Run one row; returns dict(mpps, cpu_ns_per_pkt, rss_mib, packets).
    packed: the front-end asks for packed virtqueues (both back-ends offer them)."""
    spec = ROWS[row]
    cpus, nb_cores = testpmd_cores("peer", queues)
    with backend:
        fe = Testpmd([virtio_user_vdev(sock, queues=queues, packed_vq=packed)], forward_mode=spec["frontend"],
                     cpus=cpus, huge=False, txpkts=pkt_size, rxq=queues, txq=queues,
                     nb_cores=nb_cores, extra_args=["--record-core-cycles"])
        fe_busy = TestpmdBusy(fe, nb_cores)
        with fe:
            fe.wait_link_up(0, timeout=20)
            backend.ready()
            fe.start(tx_first=spec.get("tx_first", False))
            time.sleep(warmup)
            pids = backend.pids()
            backend.busy_begin()
            fe_busy.begin()
            s0, c0, t0 = fe.port_stats()[0], cpu_seconds(pids), time.monotonic()
            time.sleep(seconds)
            s1, c1, t1 = fe.port_stats()[0], cpu_seconds(pids), time.monotonic()
            busy = {"backend": backend.busy_end(), "frontend": fe_busy.end()}
            rss = peak_rss_kib(pids)
            fe.stop()
    packets = s1[spec["count"]] - s0[spec["count"]]
    dt = t1 - t0
    return {"mpps": packets / dt / 1e6, "packets": packets, "seconds": dt,
            "cpu_ns_per_pkt": (c1 - c0) / packets * 1e9 if packets else None,
            "rss_mib": rss / 1024, "busy": busy}
