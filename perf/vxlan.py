"""VXLAN throughput: vhu's VXLAN port against the kernel's own vxlan path,
in the same run, on this machine.

    python perf/vxlan.py [--seconds 5] [--sizes 64,1400] [--json perf/vxlan.json]

Namespaces (made here, removed at exit): v16pa (vhu), v16pb (kernel VTEPs,
counts), v16pc (a kernel VTEP as the kernel path's other end).

    encap, vhu:    testpmd txonly (virtio-user, root ns) -> vhu --app patch
                   socket <-> --vxlan  -> veth -> v16pb vx0 (vni 42): rx_packets
    encap, kernel: testpmd txonly (af_packet on v16pc vx0: the kernel
                   encapsulates) -> veth -> v16pb vx1 (vni 43): rx_packets
    decap, vhu:    testpmd txonly (af_packet on v16pb vx0) -> veth -> vhu's
                   VXLAN port (frames decapsulated: its rx_packets) -> patch
                   (no front-end on the socket: the frames end there)
    decap+rx, vhu: the same, patched into testpmd rxonly (virtio-user)
    decap, kernel: testpmd txonly (af_packet on v16pb vx1) -> veth ->
                   v16pc vx0: rx_packets

The decap pair runs twice: at the host's net.core.skb_defer_max and at 0
(the "defer" column; see SKB_DEFER_MAX). Each pair shares its fixed end:
the encap rows are counted by the same kernel decapsulation, the decap
rows are fed by the same kernel encapsulation (its rate is the offered load, printed beside). vhu's worker
runs on CPU 0, testpmd on CPU 1; the kernel's softirq work runs on the CPU
of whoever sent (veth hands packets over on the sender's CPU). The machine
is shared and loaded: figures are "on a loaded machine", A/B in one run.
"""
import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vhu.testbed.dpdk import Testpmd, virtio_user_vdev  # noqa: E402
from vhu.testbed.netns import Netns, kernel_vxlan, veth  # noqa: E402

VHU_CPU, PEER_CPU = 0, 1
PA, PB, PC = "v16pa", "v16pb", "v16pc"

# Since Linux 6.x a UDP socket's recvmsg hands each datagram's buffer back to
# the CPU that allocated it, to be freed there (skb_attempt_defer_free), up
# to this many per CPU; 0 frees it on the reader's CPU. Here the allocating
# CPU is the sender's, the one both decap rows are bound by, and vhu reads
# on the other CPU: a profile of the sender's CPU put about 15 % of it in
# freeing vhu's datagrams (skb_defer_free_flush, skb_release_data), yet
# turning it off made no difference the runs could show (perf/VXLAN.md).
# The kernel row decapsulates on the sender's CPU and frees nothing across.
# The setting is host-wide (init namespace only): the decap rows run once at
# the host's value and once at 0, and it is restored afterwards.
SKB_DEFER_MAX = "/proc/sys/net/core/skb_defer_max"


@contextlib.contextmanager
def sysctl(path, value):
    """Set a sysctl for the block (value None: leave it) and restore it;
    yields the value in force."""
    with open(path) as f:
        old = f.read().strip()
    if value is None:
        yield int(old)
        return
    with open(path, "w") as f:
        f.write(str(value))
    try:
        yield value
    finally:
        with open(path, "w") as f:
            f.write(old)


@dataclass
class NsTestpmd(Testpmd):
    """testpmd inside a network namespace (for af_packet on a vxlan device)."""
    netns: Optional[str] = None

    def argv(self):
        argv = super().argv()
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv


def af_packet(iface):
    return f"net_af_packet0,iface={iface},qpairs=1,blocksz=4096,framesz=2048,framecnt=2048"


class Net:
    def __init__(self):
        self.ns = {}
        try:
            for n in (PA, PB, PC):
                self.ns[n] = Netns(n)
            a, b, c = self.ns[PA], self.ns[PB], self.ns[PC]
            veth(a, "pa0", b, "pb0", "10.16.10.1", "10.16.10.2")
            veth(c, "pc0", b, "pb1", "10.16.11.1", "10.16.11.2")
            kernel_vxlan(b, "vx0", 42, "10.16.10.2", ["10.16.10.1"], "pb0", "10.16.20.2")
            kernel_vxlan(b, "vx1", 43, "10.16.11.2", ["10.16.11.1"], "pb1", "10.16.21.2")
            kernel_vxlan(c, "vx0", 43, "10.16.11.1", ["10.16.11.2"], "pc0", "10.16.21.1")
        except BaseException:
            self.close()
            raise

    def count(self, ns, ifname):
        return self.ns[ns].counter(ifname, "rx_packets")

    def udp_receive_drops(self, ns):
        """Datagrams the kernel dropped for a full socket buffer in ns
        (/proc/net/snmp Udp RcvbufErrors): what a receiver did not keep up with."""
        out = self.ns[ns].run("cat", "/proc/net/snmp").stdout
        names, values = [line.split()[1:] for line in out.splitlines() if line.startswith("Udp:")]
        return int(values[names.index("RcvbufErrors")])

    def close(self):
        for ns in self.ns.values():
            ns.delete()


class Vhu:
    """vhu.master in v16pa: --app patch, a socket and a VXLAN port to v16pb."""

    def __init__(self, d):
        self.sock = os.path.join(d, "vhu.sock")
        self.stats = os.path.join(d, "stats.json")
        self.log = open(os.path.join(d, "vhu.log"), "w")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", PA, "taskset", "-c", str(VHU_CPU), sys.executable, "-m",
             "vhu.master", "--socket", self.sock, "--app", "patch", "--poll", "busy",
             "--vxlan", "vni=42,local=10.16.10.1,remote=10.16.10.2", "--stats-file", self.stats,
             "--stats-interval", "0.2", "--control", "none", "--cpus", str(VHU_CPU)],
            stdout=self.log, stderr=subprocess.STDOUT,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        deadline = time.monotonic() + 60
        while not self._logged("and a spare ready"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(open(self.log.name).read()[-3000:])
            time.sleep(0.1)

    def _logged(self, text):
        with open(self.log.name) as f:
            return text in f.read()

    def report(self):
        for _ in range(50):
            try:
                with open(self.stats) as f:
                    return json.load(f)
            except (OSError, ValueError, IndexError):
                time.sleep(0.05)
        raise RuntimeError("no stats")

    def port(self, i):
        return self.report()["ports"][i]

    def sample(self, i, key):
        """(counter, the time of the report it is from): a rate over vhu's
        own report times, not over when this script happened to read the
        file (reports come every 0.2 s, which would be up to 13 % of a 3 s
        window)."""
        doc = self.report()
        return doc["ports"][i][key], doc["time"]

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def window(read, seconds):
    """(count per second) of a counter over `seconds` after a 1 s warm-up.
    read() returns the count, or (count, the time it was taken)."""
    def timed():
        v = read()
        return v if isinstance(v, tuple) else (v, time.time())
    time.sleep(1.0)
    c0, t0 = timed()
    time.sleep(seconds)
    c1, t1 = timed()
    return (c1 - c0) / (t1 - t0)


def decap_pair(net, vhu, size, seconds, defer_max):
    """The decap rows, vhu's and the kernel's, at one skb_defer_max."""
    rows = []
    # decap, vhu: af_packet into v16pb vx0 -> vhu's VXLAN port, which
    # decapsulates and checks each frame; its patch peer (the socket)
    # has no front-end, so the frames end there, as the kernel row's
    # end in v16pc's IP input. Nothing else polls on the sender's CPU.
    with NsTestpmd([af_packet("vx0")], forward_mode="txonly", cpus=PEER_CPU,
                   huge=False, txpkts=size, interactive=True, netns=PB) as tp:
        full0 = net.udp_receive_drops(PA)
        tp.start()
        pps = window(lambda: vhu.sample(1, "rx_packets"), seconds)
        offered = tp.stop()[0]["tx_packets"]
        full = net.udp_receive_drops(PA) - full0
    drops = vhu.port(1)["drops_by_reason"]
    rows.append({"path": "decap", "who": "vhu", "size": size, "mpps": pps / 1e6,
                 "skb_defer_max": defer_max,
                 "vxlan_bad": drops.get("vxlan_bad", 0), "sender_tx": offered,
                 "socket_full_drops": full})
    # decap, kernel: af_packet into v16pb vx1 -> kernel decap (v16pc vx0).
    with NsTestpmd([af_packet("vx1")], forward_mode="txonly", cpus=PEER_CPU,
                   huge=False, txpkts=size, interactive=True, netns=PB) as tp:
        tp.start()
        pps = window(lambda: net.count(PC, "vx0"), seconds)
        offered = tp.stop()[0]["tx_packets"]
    rows.append({"path": "decap", "who": "kernel", "size": size, "mpps": pps / 1e6,
                 "skb_defer_max": defer_max,
                 "sender_tx": offered})
    return rows


def run(seconds, sizes):
    rows = []
    d = tempfile.mkdtemp(prefix="v16perf-")
    net = Net()
    vhu = None
    try:
        vhu = Vhu(d)
        for size in sizes:
            # encap, vhu: testpmd -> vhu -> kernel decap (v16pb vx0).
            with Testpmd([virtio_user_vdev(vhu.sock)], forward_mode="txonly", cpus=PEER_CPU,
                         huge=False, txpkts=size, interactive=True) as tp:
                tp.wait_link_up(0, timeout=30)
                tp.start()
                pps = window(lambda: net.count(PB, "vx0"), seconds)
                sent = vhu.port(1)["tx_packets"]
                tp.stop()
            rows.append({"path": "encap", "who": "vhu", "size": size, "mpps": pps / 1e6,
                         "vhu_sent": sent})
            # encap, kernel: af_packet into v16pc vx0 -> kernel decap (v16pb vx1).
            with NsTestpmd([af_packet("vx0")], forward_mode="txonly", cpus=PEER_CPU,
                           huge=False, txpkts=size, interactive=True, netns=PC) as tp:
                tp.start()
                pps = window(lambda: net.count(PB, "vx1"), seconds)
                tp.stop()
            rows.append({"path": "encap", "who": "kernel", "size": size, "mpps": pps / 1e6})
            # The two decap rows once at the host's skb_defer_max and once
            # with deferred freeing off (see SKB_DEFER_MAX).
            for defer in (None, 0):
                with sysctl(SKB_DEFER_MAX, defer) as defer_max:
                    rows.extend(decap_pair(net, vhu, size, seconds, defer_max))
            # decap and deliver, vhu: the same, into testpmd rxonly; that
            # testpmd busy-polls on the sender's CPU, so the offered load drops.
            with Testpmd([virtio_user_vdev(vhu.sock)], forward_mode="rxonly", cpus=PEER_CPU,
                         huge=False, interactive=True) as rx:
                rx.wait_link_up(0, timeout=30)
                rx.start()
                with NsTestpmd([af_packet("vx0")], forward_mode="txonly", cpus=PEER_CPU,
                               huge=False, txpkts=size, interactive=True, netns=PB) as tp:
                    tp.start()
                    time.sleep(1.0)
                    r0 = vhu.report()
                    time.sleep(seconds)
                    r1 = vhu.report()
                    p0, d0 = r0["ports"][1]["rx_packets"], r0["ports"][0]["tx_packets"]
                    p1, d1 = r1["ports"][1]["rx_packets"], r1["ports"][0]["tx_packets"]
                    dt = r1["time"] - r0["time"]
                    tp.stop()
                rx.stop()
            drops = vhu.port(1)["drops_by_reason"]
            rows.append({"path": "decap+rx", "who": "vhu", "size": size,
                         "mpps": (p1 - p0) / dt / 1e6, "delivered_mpps": (d1 - d0) / dt / 1e6,
                         "vxlan_bad": drops.get("vxlan_bad", 0)})
    finally:
        if vhu is not None:
            vhu.close()
        net.close()
        shutil.rmtree(d, ignore_errors=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--sizes", default="64,1400")
    p.add_argument("--runs", type=int, default=3,
                   help="repeat the whole set (interleaved A/B); the median is reported")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    runs = [run(a.seconds, sizes) for _ in range(a.runs)]
    print(f"{'path':8} {'who':7} {'size':>5} {'defer':>5} {'Mpps (median)':>14}  runs")
    table = []
    for i, r in enumerate(runs[0]):
        values = sorted(run_[i]["mpps"] for run_ in runs)
        med = values[len(values) // 2]
        extra = ""
        if "delivered_mpps" in r:
            d = sorted(run_[i]["delivered_mpps"] for run_ in runs)[len(values) // 2]
            extra = f"  (delivered to testpmd {d:.3f})"
        if "socket_full_drops" in r:
            extra = f"  (socket-full drops: {' '.join(str(run_[i]['socket_full_drops']) for run_ in runs)})"
        defer = r.get("skb_defer_max")
        table.append({**{k: r[k] for k in ("path", "who", "size")}, "skb_defer_max": defer,
                      "mpps_median": med, "mpps_runs": [run_[i]["mpps"] for run_ in runs]})
        print(f"{r['path']:8} {r['who']:7} {r['size']:5d} {'' if defer is None else defer:>5} "
              f"{med:14.3f}  "
              f"{' '.join(f'{v:.3f}' for v in values)}{extra}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"time": time.time(), "seconds": a.seconds, "table": table, "runs": runs},
                      f, indent=1)


if __name__ == "__main__":
    main()
