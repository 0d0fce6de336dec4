"""What dirty-page logging costs: vhu Mpps with logging off and on, same run.

    python perf/bench_log.py [--seconds 2] [--repeat 3] [--sizes 64,1500] [--rows source,echo]
                             [--rings split,packed] [--json perf/bench_log.json]

Rows (vhu.master pinned to CPU 0, vhu.frontend in this process on CPU 1):
  source   vhu.master --app source  -> vhu.frontend rx    (vhu fills RX buffers)
  echo     vhu.master --app echo    <> vhu.frontend loop  (TX drained, RX filled, checked)
For each row, size and ring layout, a fresh back-end and front-end are
measured with logging off and on (vhu.frontend log=True: LOG_ALL, a log
memfd and VHOST_VRING_F_LOG on every ring, as QEMU during a migration),
interleaved `--repeat` times; medians are compared. After each logging run
the front-end checks every page vhu changed is marked (a run that misses
one fails). Only ratios from one run mean anything on a shared machine.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from backends import BACKEND_CPU, PEER_CPU, VhuBackend  # noqa: E402

from vhu.frontend import Frontend  # noqa: E402

MODES = {"source": ("rx", "rx_packets"), "echo": ("loop", "rx_packets")}
WARMUP = 0.5


def measure(row, size, packed, log, seconds):
    mode, counter = MODES[row]
    tmp = tempfile.TemporaryDirectory(prefix="vhu-bench-log-")
    sock = os.path.join(tmp.name, "vhost.sock")
    cpus = os.sched_getaffinity(0)
    try:
        with VhuBackend(sock, row, size):
            os.sched_setaffinity(0, {PEER_CPU})
            with Frontend(sock, pkt_size=size, packed=packed, log=log, timeout=20) as fe:
                fe.run(mode, duration=WARMUP)
                if log:
                    fe.restart_log_check()
                r = fe.run(mode, duration=seconds)
                check = None
                if log:
                    fe.stop()
                    check = fe.check_log()
    finally:
        os.sched_setaffinity(0, cpus)
        tmp.cleanup()
    if r.errors or not getattr(r, counter):
        raise RuntimeError(f"{row} {size}B log={log}: {r.summary()}")
    if check is not None and check.unmarked:
        raise RuntimeError(f"{row} {size}B: {check.summary()}")
    return getattr(r, counter) / r.seconds / 1e6, check.changed if check else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sizes", default="64,1500")
    ap.add_argument("--rows", default="source,echo")
    ap.add_argument("--rings", default="split")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    results = []
    print(f"{'row':8} {'ring':6} {'size':>5}  {'off Mpps':>9} {'on Mpps':>9} {'on/off':>7}  "
          f"distinct pages changed per s (on)")
    for ring in a.rings.split(","):
        for row in a.rows.split(","):
            for size in (int(s) for s in a.sizes.split(",")):
                off, on, pages = [], [], []
                for _ in range(a.repeat):
                    off.append(measure(row, size, ring == "packed", False, a.seconds)[0])
                    mpps, changed = measure(row, size, ring == "packed", True, a.seconds)
                    on.append(mpps)
                    pages.append(changed / a.seconds)
                m_off, m_on = statistics.median(off), statistics.median(on)
                results.append({"row": row, "ring": ring, "size": size, "off": off, "on": on,
                                "pages_per_s": pages})
                print(f"{row:8} {ring:6} {size:5}  {m_off:9.3f} {m_on:9.3f} {m_on / m_off:7.2f}  "
                      f"{statistics.median(pages):.0f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpus": f"back-end {BACKEND_CPU}, front-end {PEER_CPU}",
                       "seconds": a.seconds, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
