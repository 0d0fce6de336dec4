"""QEMU Linux guests on features beyond the split-ring basics: packed
virtqueues (`-device virtio-net-pci,...,packed=on`) and a jumbo MTU given by
the front-end (`host_mtu=9000`, NET_SET_MTU), through `--app patch`.

One pair of guests, both packed=on with MTU 9000: 20 pings, 8000-byte pings
(frames of 8042 bytes spread over mergeable RX buffers of a packed ring) and
a 4 MiB TCP transfer with checksums on both sides.
"""
import pytest

from tests.test_guests import (FILE_SIZE, IP_A, IP_B, Pair, assert_ping, transfer,
                               wait_counters)

pytestmark = pytest.mark.peers("qemu")

JUMBO = 9000


def features_logged(vhu):
    """Every "virtio features 0x..." vhu logged (one per connection)."""
    return [int(line.split("virtio features")[1].split()[0], 16)
            for line in vhu.output().splitlines() if "virtio features" in line]


@pytest.fixture(scope="module")
def packed_jumbo_pair():
    p = Pair(vhu_args=["--log-level", "info"])
    p.guest_kw.update(packed=True, mtu=JUMBO, device_opts={"host_mtu": str(JUMBO)})
    p.start()
    yield p
    p.close()


def test_packed_guests_negotiate_packed_and_mtu(packed_jumbo_pair):
    vhu = packed_jumbo_pair.vhu
    feats = features_logged(vhu)
    assert len(feats) >= 2 and all(f & (1 << 34) for f in feats), feats    # RING_PACKED
    assert vhu.output().count(f"MTU {JUMBO}") >= 2
    for g in (packed_jumbo_pair.a, packed_jumbo_pair.b):
        out, rc = g.run("cat /sys/class/net/eth0/mtu")
        assert rc == 0 and out.split()[-1] == str(JUMBO), out


def test_packed_guests_ping(packed_jumbo_pair):
    assert_ping(packed_jumbo_pair.a, IP_B)
    assert_ping(packed_jumbo_pair.b, IP_A)


def test_packed_guests_jumbo_ping(packed_jumbo_pair):
    p = packed_jumbo_pair
    before = p.vhu.port(0)["rx_bytes"]
    res = p.a.ping(IP_B, count=10, interval=0.2, size=8000)
    assert res["received"] == 10 and res["loss_pct"] == 0, res["output"]
    wait_counters(p.vhu)
    # ten 8042-byte echo requests (14 + 20 + 8 + 8000) went through port 0 whole
    assert p.vhu.port(0)["rx_bytes"] - before >= 10 * 8042


def test_packed_guests_tcp_4mib_transfer(packed_jumbo_pair):
    p = packed_jumbo_pair
    assert transfer(p.a, p.b, IP_B, port=5003) == FILE_SIZE
    assert transfer(p.b, p.a, IP_A, port=5004) == FILE_SIZE
    # A full receive ring may drop a frame under load (TCP resends it): no
    # zero-drop claim here, but no broken ring either.
    assert p.vhu.port(0)["broken"] == {} and p.vhu.port(1)["broken"] == {}
