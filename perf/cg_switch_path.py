"""The single-worker switch path under callgrind, for an A/B of two builds
(instruction counts do not depend on the machine's load):

    valgrind --tool=callgrind --callgrind-out-file=OUT python perf/cg_switch_path.py CHECKOUT
    callgrind_annotate --inclusive=yes OUT | grep Engine_dispatch

CHECKOUT is a vhu tree built in place; 300 batches of 32 learned-unicast
64-byte frames go from port 0 to port 1 of one Engine (app switch, rings
not shared: the lock-free path), driven in-process by tests/ harness."""
import os
import sys
repo = sys.argv[1]
sys.path.insert(0, repo)
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/ only
import vhu; assert vhu.__file__.startswith(repo), vhu.__file__
from tests.test_worker import Guest
from tests.test_apps_engine import Ports, eth, mac, BCAST  # noqa: E402
from vhu.workers._engine import Engine
g = Guest()
e = Engine(app="switch", poll="busy")
ports = Ports(e, g, 2)
ports.send(1, [eth(BCAST, mac(2))])        # learn port 1
ports.received()
frames = [eth(mac(2), mac(1), fill=i) for i in range(32)]
for r in range(300):
    g.send(ports.drivers[0][1], 0, frames)
    e.run(0.0005)
    ports.drivers[0][1].get_used()
    got = g.received(ports.drivers[1][0], 1)
    g.post_rx(ports.drivers[1][0], 1, len(got))
print("ok", e.mac_table())
