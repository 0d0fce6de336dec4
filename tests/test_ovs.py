"""Open vSwitch with DPDK (3.1, vhu.testbed.ovs) as a peer of vhu, both ways.

OVS as a **front-end** to vhu.master: a netdev bridge joins a DPDK
virtio-user port on vhu's socket (``dpdk-devargs=net_virtio_user0,path=SOCK``)
and a dpdkvhostuser port that dpdk-testpmd (virtio-user) connects to; two
flows join them. testpmd's frames reach --app sink with exact counts, and
--app echo sends them back through OVS, where testpmd counts every one.

OVS as a **back-end** to vhu.frontend: its dpdkvhostuser port (OVS listens)
and dpdkvhostuserclient port (vhu.frontend --listen, OVS connects), in tx
mode (every frame counted on through OVS into vhu.master --app sink) and
loop mode (a flow sends every frame back out of its in-port; each one checked).

One OVS for the module (its PMD on CPU 1, main threads on CPU 0); each test
has its own bridge. vhu and the front-ends run on CPU 0, testpmd on CPU 1.
"""
import itertools
import os
import re
import subprocess
import sys
import time

import pytest

from tests.test_guests import Short
from tests.vhuproc import REPO, VhuMaster
from vhu.testbed.dpdk import Testpmd, virtio_user_vdev
from vhu.testbed.ovs import Ovs, parse_dump_ports

Testpmd.__test__ = False
PEERS = pytest.mark.peers("ovs", "testpmd")
VHU_CPU, PEER_CPU = 0, 1
COUNT = 20_000
_names = itertools.count()
SUMMARY = re.compile(r"tx (\d+) packets (\d+) bytes .*\| rx (\d+) packets (\d+) bytes .*\| errors (\d+)")


@pytest.fixture(scope="module")
def ovs():
    with Ovs(pmd_cpu=PEER_CPU, main_cpu=VHU_CPU) as o:
        yield o
        assert o.alive(), o.log_text()[-3000:]
    assert not os.path.exists(o.run_dir), "the run directory outlived OVS"


@pytest.fixture
def bridge(ovs):
    name = f"br{next(_names)}"
    ovs.add_bridge(name)
    yield name
    ovs.del_bridge(name)


@pytest.fixture
def short():
    d = Short()                       # AF_UNIX paths stay short
    yield d
    d.remove()


def unique(prefix):
    return f"{prefix}{next(_names)}"


def wait_stable(read, timeout=15.0, settle=0.6):
    """read() once it has stopped changing."""
    last, since, deadline = read(), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= settle:
            break
    return last


def into_vhu(ovs, bridge, vhu_sock):
    """OVS's virtio-user port on vhu.master's socket; its name."""
    name = unique("vu")
    ovs.add_virtio_user_port(bridge, name, vhu_sock, index=next(_names))
    ovs.wait_link_up(name)
    return name


def frontend_on_ovs(ovs, bridge, short, ovs_listens, connect, *args):
    """python -m vhu.frontend ARGS (on VHU_CPU) with an OVS vhost-user port as
    its back-end: dpdkvhostuser (OVS listens; the front-end connects) or
    dpdkvhostuserclient (the front-end listens, --listen; OVS connects).
    connect(ofport) sets the flows, before the port exists (OVS as client
    connects, and forwards, at once).
    Returns (exit status, {tx, tx_bytes, rx, rx_bytes, errors} of its summary)."""
    name, ofport = unique("fe"), 1000 + next(_names)
    connect(ofport)
    argv = ["taskset", "-c", str(VHU_CPU), sys.executable, "-m", "vhu.frontend", "--quiet",
            *map(str, args)]
    if ovs_listens:
        sock = ovs.add_vhost_user_port(bridge, name, ofport=ofport)
        proc = subprocess.run(argv + ["--socket", sock], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    else:
        sock = short / f"{name}.sock"
        with subprocess.Popen(argv + ["--socket", sock, "--listen", "--timeout", "60"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            try:
                deadline = time.monotonic() + 30
                while not os.path.exists(sock):
                    assert proc.poll() is None and time.monotonic() < deadline, "no socket"
                    time.sleep(0.05)
                ovs.add_vhost_user_client_port(bridge, name, sock, ofport=ofport)
                stdout, stderr = proc.communicate(timeout=120)
            finally:
                if proc.poll() is None:
                    proc.kill()
        rc = proc.returncode
    m = SUMMARY.search(stdout)
    assert m, (rc, stdout, stderr)
    return rc, dict(zip(("tx", "tx_bytes", "rx", "rx_bytes", "errors"), map(int, m.groups())))


def test_dump_ports_parsing():
    text = """OFPST_PORT reply (xid=0x2): 3 ports
  port LOCAL: rx pkts=0, bytes=0, drop=0, errs=0, frame=0, over=0, crc=0
           tx pkts=0, bytes=0, drop=0, errs=0, coll=0
  port  1: rx pkts=12, bytes=768, drop=0, errs=0, frame=?, over=?, crc=?
           tx pkts=45344, bytes=2902016, drop=3, errs=0, coll=?
  port  2: rx pkts=?, bytes=?, drop=?, errs=?, frame=?, over=?, crc=?
           tx pkts=?, bytes=?, drop=?, errs=?, coll=?
"""
    ports = parse_dump_ports(text)
    assert sorted(ports) == ["1", "2", "LOCAL"]
    assert ports["1"] == dict(rx_packets=12, rx_bytes=768, rx_dropped=0, rx_errors=0,
                              tx_packets=45344, tx_bytes=2902016, tx_dropped=3, tx_errors=0)
    assert set(ports["2"].values()) == {None}        # a vhost-user port reports none in 3.1


# -- OVS as a front-end of vhu.master -------------------------------------------------


@PEERS
def test_testpmd_through_ovs_into_vhu_sink(ovs, bridge, short):
    with VhuMaster(short, "--app", "sink", "--cpus", VHU_CPU) as vhu:
        vu = into_vhu(ovs, bridge, vhu.sockets[0])
        tp_name = unique("tp")
        tp_sock = ovs.add_vhost_user_port(bridge, tp_name)
        ovs.connect_ports(bridge, tp_name, vu)
        with Testpmd([virtio_user_vdev(tp_sock)], forward_mode="txonly", cpus=PEER_CPU,
                     huge=False) as tp:
            tp.wait_link_up(0)
            ovs.wait_link_up(tp_name)
            tp.start()
            time.sleep(2)
            sent = tp.stop()[0]["tx_packets"]
            out = wait_stable(lambda: ovs.port_stats(bridge, vu))
        assert sent > 1000
        # Everything testpmd sent left OVS towards vhu, or is counted as dropped there ...
        assert out["tx_packets"] + out["tx_dropped"] == sent, (out, sent)
        # ... and vhu's sink, on a core of its own, took most of it: OVS
        # drops only when vhu's RX ring is full (bounded loosely, as this
        # machine may stall vhu's core; a sink that stopped would fail).
        assert out["tx_dropped"] <= sent // 2, (out, sent)
        # ... and vhu counted exactly what OVS handed it.
        assert vhu.wait_stable("rx_packets") == out["tx_packets"] > 1000
        port = vhu.port()
        assert port["rx_bytes"] == 64 * out["tx_packets"] and port["drops"] == 0
        assert [q["queue"] for q in port["queues"]] == [0]
        ovs.del_bridge(bridge)
        vhu.wait_log("disconnected")
        vhu.stop()


@PEERS
def test_vhu_echo_back_through_ovs_to_testpmd(ovs, bridge, short):
    """testpmd io with one first burst: 32 frames go round testpmd -> OVS ->
    vhu echo -> OVS -> testpmd for two seconds; then rxonly collects what is
    still under way. testpmd received exactly what it sent, vhu echoed all."""
    with VhuMaster(short, "--app", "echo", "--cpus", VHU_CPU) as vhu:
        vu = into_vhu(ovs, bridge, vhu.sockets[0])
        tp_name = unique("tp")
        tp_sock = ovs.add_vhost_user_port(bridge, tp_name)
        ovs.connect_ports(bridge, tp_name, vu)
        # --no-flush-rx: testpmd would drop what waits in its receive queue at `start`.
        with Testpmd([virtio_user_vdev(tp_sock)], forward_mode="io", cpus=PEER_CPU,
                     huge=False, extra_args=["--no-flush-rx"]) as tp:
            tp.wait_link_up(0)
            ovs.wait_link_up(tp_name)
            looped = tp.run_for(2.0, tx_first=True)[0]
            tp.set_mode("rxonly")
            tp.start()
            wait_stable(lambda: vhu.port()["tx_packets"])
            time.sleep(0.5)
            rest = tp.stop()[0]
        sent, got = looped["tx_packets"], looped["rx_packets"] + rest["rx_packets"]
        assert sent > 1000 and looped["tx_dropped"] == 0
        assert got == sent, (looped, rest)
        port = vhu.port()
        assert port["rx_packets"] == port["tx_packets"] == sent
        assert port["tx_bytes"] == 64 * sent and port["drops"] == 0
        ovs.del_bridge(bridge)
        vhu.stop()


# -- OVS as a back-end of vhu.frontend ------------------------------------------------


@PEERS
@pytest.mark.parametrize("ovs_listens", [True, False], ids=["dpdkvhostuser", "dpdkvhostuserclient"])
def test_frontend_tx_through_ovs(ovs, bridge, short, ovs_listens):
    """vhu.frontend --mode tx --count N into OVS, on through OVS into vhu.master
    --app sink: N frames sent, N used by OVS, N (less OVS's counted drops)
    out of OVS and into vhu."""
    with VhuMaster(short, "--app", "sink", "--cpus", VHU_CPU) as vhu:
        vu = into_vhu(ovs, bridge, vhu.sockets[0])
        rc, fe = frontend_on_ovs(ovs, bridge, short, ovs_listens,
                                 lambda ofport: ovs.connect_ports(bridge, ofport, vu),
                                 "--mode", "tx", "--count", COUNT)
        assert rc == 0 and fe["tx"] == COUNT and fe["tx_bytes"] == 64 * COUNT, fe
        out = wait_stable(lambda: ovs.port_stats(bridge, vu))
        assert out["tx_packets"] + out["tx_dropped"] == COUNT, out
        # No bound on OVS's drops here: vhu.frontend runs on vhu's CPU, and
        # while its burst of COUNT runs vhu's worker waits for that CPU (the
        # sink test above, with the sender on the other CPU, bounds them).
        assert vhu.wait_stable("rx_packets") == out["tx_packets"] > 0
        ovs.del_bridge(bridge)
        vhu.stop()


@PEERS
@pytest.mark.parametrize("ovs_listens", [True, False], ids=["dpdkvhostuser", "dpdkvhostuserclient"])
def test_frontend_loop_through_ovs(ovs, bridge, short, ovs_listens):
    """A flow sends each frame back out of its in-port: vhu.frontend --mode
    loop --count N gets all N back, in order, byte for byte."""
    rc, fe = frontend_on_ovs(
        ovs, bridge, short, ovs_listens,
        lambda ofport: ovs.set_flows(bridge, [f"in_port={ofport},actions=in_port"]),
        "--mode", "loop", "--count", COUNT)
    assert rc == 0, fe
    assert fe["tx"] == fe["rx"] == COUNT and fe["errors"] == 0, fe
