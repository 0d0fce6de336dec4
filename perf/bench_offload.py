"""Offloads: what they buy VM to VM, and what the software fallback costs.

    python perf/bench_offload.py segment        # software segmentation rate
    python perf/bench_offload.py vm [--mib 64] [--tool nc|iperf3]
                                                # two QEMU guests through --app patch

segment: 64 KiB TCP/IPv4 frames (MSS 1448) cut into segments by
vhu.workers._offload.tso_segment, every IPv4 and TCP checksum computed, in
one thread with no Python per frame: Gbit/s of large frames in (what a
port without TSO can be fed from one worker), segments/s out. Not counted:
the copy of each segment into the receiving guest's ring.

vm: the same run times a TCP transfer between two TCG guests (busybox nc
of a file of random bytes, md5 checked; or iperf3 -n, Debian's iperf3 put
into the guest image by vhu.testbed.guest, which needs no file I/O), with offloads (QEMU defaults: CSUM,
GUEST_CSUM, HOST/GUEST_TSO4 negotiated with vhu) and without (QEMU
csum=off,guest_csum=off,host_tso4=off,... on both), A/B in one run.
Figures are from a loaded, shared 2-core machine: compare the two rows, not
the absolute numbers. vhu runs on CPU 0; by default its worker busy-polls
and both QEMUs share CPU 1. ``--poll adaptive --guest-cpus 0-1`` lets the
guests (whose TCG vCPUs are what limits either row) use vhu's CPU too when
its worker sleeps. Each round is one transfer with offloads and one
without; the per-round ratios and their median are printed with the best
of each row.
"""
import argparse
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tso_frame(payload=65535 - 14 - 20 - 32):
    from tests.test_offload import build
    frame, start, coff = build(False, 6, os.urandom(payload), tcp_opts=b"\x01\x01\x08\x0a" + bytes(8))
    return frame, start, coff


def segment(seconds):
    from vhu.workers import _offload as off
    frame, start, coff = tso_frame()
    off.segment_rate(frame, off.GSO["tcpv4"], 1448, start, coff, 0.2)      # warm up
    frames, segs, dt = off.segment_rate(frame, off.GSO["tcpv4"], 1448, start, coff, seconds)
    gbps = frames * len(frame) * 8 / dt / 1e9
    print(f"software segmentation: {len(frame)}-byte frames, MSS 1448: {frames / dt:,.0f} frames/s "
          f"= {gbps:.2f} Gbit/s in, {segs / dt / 1e6:.3f} M segments/s out ({dt:.1f} s)")
    return gbps


def timed_transfer(src, dst, dst_ip, port, size):
    from tests.test_guests import md5_and_size
    src.run(f"dd if=/dev/urandom of=/tmp/tx bs=65536 count={size // 65536} 2>/dev/null",
            check=True, timeout=120)
    _, sent = md5_and_size(src, "/tmp/tx")
    dst.run(f"rm -f /tmp/rx; sleep 900 | nc -l -p {port} > /tmp/rx &", check=True)
    dst.run(f"i=0; while ! grep -q ':{port:04X} 00000000:0000 0A' /proc/net/tcp && [ $i -lt 50 ]; "
            f"do sleep 0.1; i=$((i+1)); done", check=True)
    t0 = time.monotonic()
    out, rc = src.run(f"nc {dst_ip} {port} < /tmp/tx", timeout=900)
    dt = time.monotonic() - t0
    assert rc == 0, out
    dst.run("i=0; while pidof nc >/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; "
            "killall sleep; wait", timeout=60)
    got_size, got = md5_and_size(dst, "/tmp/rx")
    assert got_size == size and got == sent, "transfer corrupted"
    return dt


def timed_iperf(src, dst, dst_ip, port, size):
    """iperf3 -n size from src to dst: the seconds the receiver reports."""
    dst.run(f"iperf3 -s -1 -p {port} > /tmp/iperf-s.log 2>&1 &", check=True)
    dst.run(f"i=0; while ! grep -q ':{port:04X} 00000000:0000 0A' /proc/net/tcp && [ $i -lt 50 ]; "
            f"do sleep 0.1; i=$((i+1)); done", check=True)
    out, rc = src.run(f"iperf3 -c {dst_ip} -p {port} -n {size} -f m", timeout=900)
    assert rc == 0, out
    m = re.search(r"0\.00-(\d+\.\d+)\s+sec\s+(\S+) [KMG]Bytes\s+(\S+) [KMG]bits/sec\s+receiver", out)
    assert m, out
    return float(m.group(1))


def offload_pair(on, poll, guest_cpus):
    """Both guests with offloads on, or both off; vhu polling as asked, the
    guests on the CPUs asked (None: anywhere)."""
    from tests.test_offload_guests import OffloadPair
    p = OffloadPair(on, on, ["--poll", poll])
    p.guest_kw["cpu"] = guest_cpus
    return p.start()


def vm(mib, rounds, tool="nc", poll="busy", guest_cpus="1"):
    from tests.test_guests import IP_B
    size = mib << 20
    rows = {True: [], False: []}
    pairs = {on: offload_pair(on, poll, guest_cpus) for on in (True, False)}
    try:
        for r in range(rounds):                  # interleaved: the machine's load hits both
            for on, p in pairs.items():
                run = timed_iperf if tool == "iperf3" else timed_transfer
                dt = run(p.a, p.b, IP_B, 5200 + r * 2 + on, size)
                rows[on].append(size * 8 / dt / 1e6)
                gso = p.vhu.port(0)["offload"]["tx_gso"]
                print(f"offloads {'on ' if on else 'off'} round {r}: {mib} MiB in {dt:.1f} s = "
                      f"{rows[on][-1]:.0f} Mbit/s (GSO frames from guest a so far: {gso})",
                      flush=True)
    finally:
        for p in pairs.values():
            p.close()
    best = {on: max(v) for on, v in rows.items()}
    ratios = sorted(a / b for a, b in zip(rows[True], rows[False]))
    print("per round, on/off: " + " ".join(f"{r:.1f}x" for r in ratios)
          + f"; median {statistics.median(ratios):.1f}x")
    print(f"VM to VM TCP ({tool}, {mib} MiB, vhu --poll {poll} on CPU 0, guests on CPU {guest_cpus}), "
          f"best of {rounds}: offloads on {best[True]:.0f} Mbit/s, off "
          f"{best[False]:.0f} Mbit/s: {best[True] / best[False]:.1f}x")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("segment", "vm"))
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--tool", choices=("nc", "iperf3"), default="nc")
    ap.add_argument("--poll", choices=("busy", "epoll", "adaptive"), default="busy",
                    help="vhu's worker loop (vm; vhu runs on CPU 0)")
    ap.add_argument("--guest-cpus", default="1",
                    help="taskset list for both QEMUs (vm), e.g. 0-1 to let them use vhu's CPU too")
    a = ap.parse_args()
    if a.what == "segment":
        segment(a.seconds)
    else:
        vm(a.mib, a.rounds, a.tool, a.poll, a.guest_cpus)


if __name__ == "__main__":
    main()
