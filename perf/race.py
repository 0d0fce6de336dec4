"""vhu against DPDK's vhost back-end, same front-end, same pinning, one run.

    python perf/race.py [--seconds 2] [--repeat 3] [--sizes 64,1500] [--rows sink,source,echo]
                        [--rings split,packed] [--queues 1,4] [--workers N]
                        [--json perf/race.json] [--results perf/RESULTS.md] [--baseline DIR]
                        [--cpus BACKEND:PEER]

For each row (sink/rxonly, source/txonly, echo/io) and frame size, runs
DPDK testpmd `--vdev net_vhost0` and then `python -m vhu.master` as the
back-end on CPU 0, against DPDK testpmd `--vdev net_virtio_user0` on CPU 1,
and prints DPDK Mpps, vhu Mpps, vhu/DPDK, CPU time per packet and peak RSS
of each back-end. --rings packed makes the front-end use packed virtqueues
(virtio-user packed_vq=1); --queues 4 runs 4 queue pairs with as many vhu
workers (--workers caps it), all on the back-end's one CPU. On a larger
host, --cpus 0-4:5-9 gives the back-end and the front-end a CPU list each
(default 0:1): vhu's workers round-robin over the back-end list, and each
testpmd's main lcore on its list's first CPU with one forwarding lcore per
queue pair over the rest (perf/backends.py PINNING).
The two-port rows (--rows switch,patch) race `vhu.master --app switch` (or
patch) with one worker against Open vSwitch-DPDK (netdev bridge, two
dpdkvhostuser ports, the NORMAL action or two port-to-port flows, its PMD on
CPU 0): one testpmd on CPU 1 with two virtio-user ports in mac forwarding,
each port's --eth-peer the other port's MAC, --tx-first; the rate is both
ports' RX (single queue pair only). Only ratios from one run are meaningful on shared machines.
Each run also records both sides' busy share (perf/backends.py): which of
the back-end and the front-end bounds the row.
With --results, the chart of every row (perf/plot.py, needs the perf extra) is
written beside the JSON (race.json -> race.png) and embedded in the markdown.
"""
import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from backends import (PINNING, SWITCH_ROWS, DpdkBackend, OvsBackend, VhuBackend,  # noqa: E402
                      measure, measure_two_ports, pin)
from vhu.config import UsageError, parse_cpus  # noqa: E402


def machine():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=3,
                    help="measurements per back-end and row, interleaved; medians are compared")
    ap.add_argument("--sizes", default="64,1500")
    ap.add_argument("--rows", default="sink,source,echo")
    ap.add_argument("--rings", default="split", help="split, packed or both (comma list)")
    ap.add_argument("--queues", default="1", help="queue pairs, comma list (e.g. 1,4)")
    ap.add_argument("--workers", type=int, default=None,
                    help="vhu workers (default: one per queue pair)")
    ap.add_argument("--poll", default="busy")
    ap.add_argument("--baseline", default=None, metavar="DIR",
                    help="also race vhu from another checkout, built in place "
                         "(python setup.py build_ext --inplace): the 'base' column, same run")
    ap.add_argument("--json", default="perf/race.json")
    ap.add_argument("--results", default=None, help="also rewrite this markdown file")
    ap.add_argument("--cpus", default="0:1", metavar="BACKEND:PEER",
                    help="CPU lists of the back-end and the front-end, e.g. 0-4:5-9 (default 0:1)")
    a = ap.parse_args(argv)
    backend_cpus, sep, peer_cpus = a.cpus.partition(":")
    try:
        if not sep:
            raise UsageError(f"--cpus: {a.cpus!r} is not BACKEND:PEER, e.g. 0-4:5-9")
        pin(parse_cpus(backend_cpus), parse_cpus(peer_cpus))
    except (UsageError, ValueError) as exc:
        ap.error(str(exc))
    results = []
    for ring, queues, size, row in itertools.product(
            a.rings.split(","), [int(q) for q in a.queues.split(",")],
            [int(x) for x in a.sizes.split(",")], a.rows.split(",")):
        if row in SWITCH_ROWS:
            if queues != 1:
                continue
            entry = race_two_port_row(row, size, ring, a)
        else:
            entry = race_row(row, size, ring, queues, a.workers or queues, a)
        results.append(entry)
        print(format_row(entry), flush=True)
    doc = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
           "cpus": {side: list(cpus) for side, cpus in PINNING.items()},
           "command": " ".join(["python", "perf/race.py"] + (argv or sys.argv[1:])),
           "results": results}
    with open(a.json, "w") as f:
        json.dump(doc, f, indent=1)
    chart = write_chart(doc, a.json) if a.results else None
    table = render(doc, os.path.relpath(chart, os.path.dirname(a.results) or ".") if chart else None)
    print()
    print(table)
    if a.results:
        with open(a.results, "w") as f:
            f.write(table)
    return 0


def write_chart(doc, json_path):
    """perf/plot.py's chart beside the JSON (race.json -> race.png); None
    without matplotlib (the perf extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("race: no matplotlib (pip install -e '.[perf]'), so no chart", file=sys.stderr)
        return None
    from plot import plot
    return plot(doc, os.path.splitext(json_path)[0] + ".png")


def race_row(row, size, ring, queues, workers, a):
    """Both back-ends on one row, interleaved repeats; medians compared."""
    entry = {"row": row, "pkt_size": size, "queues": queues, "workers": workers, "ring": ring}

    def run(name):
        with tempfile.TemporaryDirectory(prefix="vhu-race-") as d:    # one per run, removed after it
            sock = os.path.join(d, "vhost.sock")
            be = (DpdkBackend(sock, row, size, queues) if name == "dpdk" else
                  VhuBackend(sock, row, size, queues, workers, a.poll,
                             tree=a.baseline if name == "base" else None))
            return measure(be, sock, row, size, a.seconds, queues=queues, packed=ring == "packed")
    return interleaved(entry, "dpdk", run, a)


def race_two_port_row(row, size, ring, a):
    """vhu --app switch|patch against Open vSwitch-DPDK (and the baseline),
    interleaved repeats; medians compared."""
    entry = {"row": row, "pkt_size": size, "queues": 1, "workers": 1, "ring": ring, "peer": "ovs"}

    def run(name):
        if name == "ovs":
            return measure_two_ports(OvsBackend(row), None, size, a.seconds, packed=ring == "packed")
        with tempfile.TemporaryDirectory(prefix="vhu-race-") as d:
            socks = [os.path.join(d, f"vhost{i}.sock") for i in (0, 1)]
            be = VhuBackend(socks[0], row, size, 1, 1, a.poll, more_sockets=socks[1:],
                            tree=a.baseline if name == "base" else None)
            return measure_two_ports(be, socks, size, a.seconds, packed=ring == "packed")
    return interleaved(entry, "ovs", run, a)


def interleaved(entry, peer, run, a):
    """a.repeat rounds of run(name) for the peer, vhu and (--baseline) base,
    interleaved so slow phases of a shared host hit every back-end; each
    back-end's median run, its runs' rates and its error go into entry,
    with vhu/peer and vhu/base."""
    names = (peer, "vhu") + (("base",) if getattr(a, "baseline", None) else ())
    runs = {name: [] for name in names}
    errors = {}
    for _ in range(a.repeat):
        for name in names:
            try:
                runs[name].append(run(name))
            except Exception as exc:          # a failed run is reported, not hidden
                errors[name] = str(exc).splitlines()[0][:200]
                # The whole story (the peer's output, the back-end's log) to stderr.
                print(f"{entry['row']} {entry.get('ring', '')} {entry['pkt_size']}: {name} run failed:\n"
                      + "".join(traceback.format_exception_only(exc)), file=sys.stderr)
            time.sleep(0.3)
    for name in names:
        entry[name] = median_run(runs[name]) if runs[name] else {}
        entry[name]["runs_mpps"] = [round(r["mpps"], 3) for r in runs[name]]
        if name in errors:
            entry[name]["error"] = errors[name]
    p, v = entry[peer].get("mpps"), entry["vhu"].get("mpps")
    entry["ratio"] = v / p if p and v is not None else None
    if "base" in entry:
        b = entry["base"].get("mpps")
        entry["vs_base"] = v / b if b and v is not None else None
    return entry


def median_run(runs):
    """The run with the median rate (its CPU and memory figures go with it)."""
    ordered = sorted(runs, key=lambda r: r["mpps"])
    return dict(ordered[len(ordered) // 2])


def _f(x, fmt):
    return format(x, fmt) if isinstance(x, (int, float)) else "-"


def format_row(e):
    peer = e.get("peer", "dpdk")
    d, v = e[peer], e["vhu"]
    base = (f"  base {_f(e['base'].get('mpps'), '6.2f')} Mpps  vhu/base {_f(e['vs_base'], '.2f')}"
            if "base" in e else "")
    errors = "".join(f"  {name} failed: {e[name]['error']}" for name in (peer, "vhu", "base")
                     if e.get(name, {}).get("error"))
    return (f"{e['row']:6} {e.get('ring', 'split'):6} {e['queues']}q {e['pkt_size']:5}B  {peer:4} {_f(d.get('mpps'), '6.2f')} Mpps  "
            f"vhu {_f(v.get('mpps'), '6.2f')} Mpps  ratio {_f(e['ratio'], '.2f')}{base}  "
            f"busy back-end/front-end: {peer} {_busy(d)}, vhu {_busy(v)}{errors}")


COLLAPSED = 0.05     # a run under 5% of the row's best: the loop died (not a slow mode)


def collapsed_runs(runs):
    """The runs whose loop collapsed: flagged in the table, never averaged away."""
    best = max(runs, default=0)
    return [r for r in runs if r < COLLAPSED * best] if best > 0 else list(runs)


def _rate(side):
    """Median Mpps, with the spread of the runs so noise is visible and a
    count of collapsed runs."""
    runs = side.get("runs_mpps") or []
    if len(runs) < 2:
        return _f(side.get("mpps"), ".2f")
    dead = collapsed_runs(runs)
    flag = f", **{len(dead)} collapsed**" if dead else ""
    return f"{_f(side.get('mpps'), '.2f')} ({min(runs):.1f}–{max(runs):.1f}{flag})"


def _busy(side):
    """The median run's busy shares, back-end / front-end (backends.py:
    which side bounds the row); '-' where a build or peer does not say."""
    b = side.get("busy") or {}
    return f"{_f(b.get('backend'), '.2f')} / {_f(b.get('frontend'), '.2f')}"


def _pinning(doc):
    """The run's CPU lists (back-end, front-end); runs before --cpus used 0 and 1."""
    cpus = doc.get("cpus", {"backend": [0], "peer": [1]})
    return cpus["backend"], cpus["peer"]


def render(doc, chart=None):
    """The markdown of perf/RESULTS.md; chart: the PNG's path relative to it."""
    m = doc["machine"]
    be_cpus, fe_cpus = _pinning(doc)
    lines = [f"# vhu vs DPDK vhost back-end ({doc['time']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}.",
             f"Command: `{doc['command']}`. Back-end on CPU {','.join(map(str, be_cpus))}, DPDK virtio-user "
             f"front-end (testpmd) on CPU {','.join(map(str, fe_cpus))}; rates read at the front-end. Each figure is the median of "
             f"interleaved runs, with the lowest and highest run in brackets (all runs "
             f"in the JSON file); a run under {COLLAPSED:.0%} of its row's best is counted "
             f"as collapsed. Busy: the share of each side's polling time spent in iterations "
             f"that moved packets, back-end / front-end (testpmd), in the median run: the "
             f"side near 1.00 bounds the row, the other waits for it.", "",
             ]
    names = {"sink": "sink / txonly", "source": "source / rxonly", "echo": "echo / io",
             "switch": "switch / 2 ports mac", "patch": "patch / 2 ports mac"}
    two_port = [e for e in doc["results"] if e.get("peer") == "ovs"]
    if len(two_port) < len(doc["results"]):
        lines += ["| row (back-end/front-end) | ring | size | queues | DPDK Mpps | vhu Mpps | vhu/DPDK | "
                  "DPDK CPU ns/pkt | vhu CPU ns/pkt | DPDK RSS MiB | vhu RSS MiB | busy with DPDK | "
                  "busy with vhu |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in doc["results"]:
        if e in two_port:
            continue
        d, v = e["dpdk"], e["vhu"]
        lines.append(
            f"| {names.get(e['row'], e['row'])} | {e.get('ring', 'split')} | {e['pkt_size']} | "
            f"{e['queues']} | "
            f"{_rate(d)} | {_rate(v)} | {_f(e['ratio'], '.2f')} | "
            f"{_f(d.get('cpu_ns_per_pkt'), '.0f')} | {_f(v.get('cpu_ns_per_pkt'), '.0f')} | "
            f"{_f(d.get('rss_mib'), '.0f')} | {_f(v.get('rss_mib'), '.0f')} | "
            f"{_busy(d)} | {_busy(v)} |")
    if two_port:
        lines += ["", "Two ports through the back-end's switch (or patch) against Open "
                  f"vSwitch-DPDK (NORMAL action, or two port-to-port flows; its PMD on CPU {be_cpus[0]}), "
                  f"one vhu worker on CPU {be_cpus[0]}; one testpmd on CPU {fe_cpus[0]} with two virtio-user ports "
                  "in mac forwarding toward each other; the rate is both ports' RX:", "",
                  "| row (back-end/front-end) | ring | size | OVS Mpps | vhu Mpps | vhu/OVS | "
                  "OVS CPU ns/pkt | vhu CPU ns/pkt | OVS RSS MiB | vhu RSS MiB | busy with OVS | "
                  "busy with vhu |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in two_port:
            o, v = e["ovs"], e["vhu"]
            lines.append(
                f"| {names.get(e['row'], e['row'])} | {e.get('ring', 'split')} | {e['pkt_size']} | "
                f"{_rate(o)} | {_rate(v)} | {_f(e['ratio'], '.2f')} | "
                f"{_f(o.get('cpu_ns_per_pkt'), '.0f')} | {_f(v.get('cpu_ns_per_pkt'), '.0f')} | "
                f"{_f(o.get('rss_mib'), '.0f')} | {_f(v.get('rss_mib'), '.0f')} | "
                f"{_busy(o)} | {_busy(v)} |")
    based = [e for e in doc["results"] if "base" in e]
    if based:
        lines += ["", "Against the baseline build (`--baseline`), same run:", "",
                  "| row | ring | size | queues | base Mpps | vhu Mpps | vhu/base |",
                  "|---|---|---|---|---|---|---|"]
        for e in based:
            lines.append(f"| {names.get(e['row'], e['row'])} | {e.get('ring', 'split')} | "
                         f"{e['pkt_size']} | {e['queues']} | {_rate(e['base'])} | "
                         f"{_rate(e['vhu'])} | {_f(e.get('vs_base'), '.2f')} |")
    if chart:
        lines += ["", f"![Mpps of every row, median and spread of the runs ({doc['time']})]({chart})"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
