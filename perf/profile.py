"""Where a vhu worker's cycles go: one race row, sampled with `perf record`.

    python perf/profile.py --row echo --ring split --size 64 --seconds 3

Runs vhu.master (busy poll, pinned to the back-end CPU) against the DPDK
virtio-user front-end exactly as perf/race.py does (the two-port rows,
switch and patch, with testpmd's two ports mac-forwarding to each other), samples the back-end's
CPU with `perf record -C` while traffic flows, and prints the rate and the
top symbols. Hardware counters are often missing in VMs; perf then falls
back to the cpu-clock timer, which is what the percentages are made of.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import backends as B  # noqa: E402
from backends import VhuBackend  # noqa: E402
from vhu.testbed.dpdk import Testpmd, virtio_user_vdev  # noqa: E402


def record(data, seconds):
    """Sample the back-end's CPU for `seconds`."""
    subprocess.run(["perf", "record", "-q", "-C", str(B.BACKEND_CPU), "-o", data,
                    "--", "sleep", str(seconds)], check=True)


def sample_one_port(a, tmp, data):
    """A one-port row, as perf/race.py runs it; the rate while sampled."""
    spec = B.ROWS[a.row]
    sock = os.path.join(tmp, "vhost.sock")
    with VhuBackend(sock, a.row, a.size) as be:
        fe = Testpmd([virtio_user_vdev(sock, packed_vq=a.ring == "packed")],
                     forward_mode=spec["frontend"], cpus=B.PEER_CPU, huge=False,
                     txpkts=a.size, nb_cores=1)
        with fe:
            fe.wait_link_up(0, timeout=20)
            be.ready()
            fe.start(tx_first=spec.get("tx_first", False))
            time.sleep(1.0)
            s0, t0 = fe.port_stats()[0], time.monotonic()
            record(data, a.seconds)
            s1, t1 = fe.port_stats()[0], time.monotonic()
            fe.stop()
    return (s1[spec["count"]] - s0[spec["count"]]) / (t1 - t0) / 1e6


def sample_two_ports(a, tmp, data):
    """A two-port row (switch, patch), as perf/race.py runs it: testpmd's
    two virtio-user ports mac-forwarding toward each other; both ports' RX."""
    socks = [os.path.join(tmp, f"vhost{i}.sock") for i in (0, 1)]
    with VhuBackend(socks[0], a.row, a.size, more_sockets=socks[1:]):
        vdevs = [virtio_user_vdev(s, i, packed_vq=a.ring == "packed", mac=B.SWITCH_MACS[i])
                 for i, s in enumerate(socks)]
        peers = [f"--eth-peer={i},{B.SWITCH_MACS[1 - i]}" for i in (0, 1)]
        fe = Testpmd(vdevs, forward_mode="mac", cpus=B.PEER_CPU, huge=False,
                     txpkts=a.size, nb_cores=1, extra_args=peers)
        with fe:
            fe.wait_link_up(0, timeout=20)
            fe.wait_link_up(1, timeout=20)
            fe.start(tx_first=True)
            time.sleep(1.0)
            s0, t0 = fe.port_stats(), time.monotonic()
            record(data, a.seconds)
            s1, t1 = fe.port_stats(), time.monotonic()
            fe.stop()
    return sum(s1[p]["rx_packets"] - s0[p]["rx_packets"] for p in (0, 1)) / (t1 - t0) / 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", choices=sorted(B.ROWS) + list(B.SWITCH_ROWS), default="echo")
    ap.add_argument("--ring", choices=("split", "packed"), default="split")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--keep", help="keep perf.data at this path")
    a = ap.parse_args(argv)
    if not shutil.which("perf"):
        ap.error("perf is not installed (apt-get install linux-perf)")
    tmp = tempfile.mkdtemp(prefix="vhu-profile-")
    data = a.keep or os.path.join(tmp, "perf.data")
    if a.row in B.SWITCH_ROWS:
        mpps = sample_two_ports(a, tmp, data)
    else:
        mpps = sample_one_port(a, tmp, data)
    print(f"{a.row} {a.ring} {a.size}B: {mpps:.2f} Mpps at the front-end while sampled")
    report = subprocess.run(["perf", "report", "-i", data, "--stdio", "--sort", "dso,symbol"],
                            capture_output=True, text=True, check=True).stdout
    lines = [ln for ln in report.splitlines() if ln.strip() and not ln.startswith("#")]
    for ln in lines[:a.top]:
        print(ln.rstrip())
    if not a.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
