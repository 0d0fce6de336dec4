"""`--app switch` with three QEMU guests, one of them (C) without offloads:
transfers from TSO guest A to guest B (which takes large frames) and to C
(which gets them segmented by vhu) are intact, md5 equal; the ARP
broadcasts and the first frames to a not yet learned MAC are flooded, each
copy as its receiver can take it."""
import os

import pytest

from tests.test_guests import BOOT_TIMEOUT, GUEST_CPU, VHU_CPU, Short, wait_ping
from tests.test_offload_guests import NO_OFFLOADS, RINGS, WANTED, negotiated, transfer
from tests.vhuproc import VhuMaster
from vhu.testbed.guest import Guest

pytestmark = pytest.mark.peers("qemu")
SIZE = 16 << 20
IPS = {"a": "10.0.5.1", "b": "10.0.5.2", "c": "10.0.5.3"}


@pytest.fixture(scope="module")
def three():
    d = Short()
    vhu = VhuMaster(d, "--app", "switch", "--cpus", VHU_CPU, sockets=("a.sock", "b.sock", "c.sock"))
    guests, served = {}, False
    try:
        vhu.wait_sockets()
        vhu.wait_started()
        for i, name in enumerate("abc"):
            opts = dict(RINGS, **(NO_OFFLOADS if name == "c" else {}))
            guests[name] = Guest(d / f"{name}.sock", ip=f"{IPS[name]}/24",
                                 mac=f"52:54:00:00:05:0{i + 1}", cpu=GUEST_CPU, device_opts=opts,
                                 name=f"vhu-i15-{name}-{os.getpid()}",
                                 log_path=d / f"{name}.console").launch()
        for g in guests.values():
            g.wait_ready(BOOT_TIMEOUT)
        yield vhu, guests
        served = True
    finally:
        for g in guests.values():
            g.close()
        vhu.stop(check=served)      # the balance check, unless set-up failed
        d.remove()


def test_tso_guest_to_both_others_through_the_switch(three):
    vhu, g = three
    assert WANTED <= negotiated(g["a"]) and WANTED <= negotiated(g["b"])
    assert negotiated(g["c"]) == set()
    wait_ping(g["a"], IPS["b"])
    wait_ping(g["a"], IPS["c"])
    assert transfer(g["a"], g["b"], IPS["b"], port=5051, size=SIZE) == SIZE
    assert transfer(g["a"], g["c"], IPS["c"], port=5052, size=SIZE) == SIZE
    vhu.wait_stable("rx_packets", port=0, settle=0.5)
    a, b, c = (vhu.port(i)["offload"] for i in range(3))
    assert a["tx_gso"] > 0, a
    assert b["rx_gso"] > 0 and b["rx_segmented"] == 0, b          # large frames as they are
    assert c["rx_segmented"] > 0 and c["rx_gso"] == 0, c          # segmented by vhu
    for i in range(3):
        p = vhu.port(i)
        assert p["drops_by_reason"]["bad_offload"] == 0 and p["broken"] == {}, p
