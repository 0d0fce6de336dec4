"""The single-worker switch path under callgrind, for an A/B of two builds
(instruction counts do not depend on the machine's load):

    PY=$(python -c 'import sys; print(sys.executable)')   # not a pyenv shim
    valgrind --tool=callgrind --callgrind-out-file=OUT $PY perf/cg_switch_path.py CHECKOUT
    python perf/cg_switch_path.py --per-frame OUT CHECKOUT

CHECKOUT is a vhu tree built in place; 300 batches of 32 learned-unicast
64-byte frames go from port 0 to port 1 of one Engine (app switch, rings
not shared: the lock-free path), driven in-process by tests/ harness.

--per-frame prints the instructions per frame spent on the lines of the
switch's decision (Engine.switch_out and the MAC table functions it calls),
from callgrind_annotate's per-line counts of the generated C: those lines
run once per frame, so unlike the inclusive counts of Engine.run or
Engine.forward (which also count the empty polls of a run timed in
seconds) they do not depend on how fast valgrind ran."""
import os
import re
import subprocess
import sys

FRAMES = 300 * 32 + 1
DECISION = ("_6Engine_switch_out", "smac_learn", "smac_lookup", "_6Engine_mac_learn",
            "_6Engine_mac_lookup")


def per_frame(out, checkout):
    """{function: instructions per frame} over the DECISION functions."""
    ann = subprocess.run(["callgrind_annotate", "--auto=yes", "--context=0", out,
                          "vhu/workers/_engine.c"], cwd=checkout, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    counts = {}
    for name in DECISION:
        total, inside = 0, False
        for line in ann:
            m = re.match(r"\s*([\d,]+|\.)\s+(?:\([^)]*\)\s+)?(.*)", line)
            if not m:
                continue
            count, code = m.groups()
            if code.startswith("static") and name in code and "(" in code:
                inside = True       # the definition of that function in _engine.c
                continue
            if inside and code.startswith("static ") and "(" in code and "{" in code:
                break
            if inside and count != ".":
                total += int(count.replace(",", ""))
        counts[name] = total / FRAMES
    return counts


def drive(repo):
    sys.path.insert(0, repo)
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/ only
    import vhu
    assert vhu.__file__.startswith(repo), vhu.__file__
    from tests.test_worker import Guest
    from tests.test_apps_engine import Ports, eth, mac, BCAST
    from vhu.workers._engine import Engine
    g = Guest()
    e = Engine(app="switch", poll="busy")
    ports = Ports(e, g, 2)
    ports.send(1, [eth(BCAST, mac(2))])        # learn port 1
    ports.received()
    frames = [eth(mac(2), mac(1), fill=i) for i in range(32)]
    for _ in range(300):
        g.send(ports.drivers[0][1], 0, frames)
        e.run(0.0005)
        ports.drivers[0][1].get_used()
        got = g.received(ports.drivers[1][0], 1)
        g.post_rx(ports.drivers[1][0], 1, len(got))
    print("ok", e.mac_table())


if __name__ == "__main__":
    if sys.argv[1] == "--per-frame":
        counts = per_frame(sys.argv[2], sys.argv[3])
        for name, n in counts.items():
            print(f"{name:22} {n:8.1f}")
        print(f"{'decision, per frame':22} {sum(counts.values()):8.1f}")
    else:
        drive(sys.argv[1])
