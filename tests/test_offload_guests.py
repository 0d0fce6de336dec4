"""Offloads end to end with QEMU 7.2 Linux guests through `--app patch`.

Both guests with offloads (QEMU's defaults): they negotiate CSUM,
GUEST_CSUM, HOST_TSO4 and GUEST_TSO4 (the device's features in sysfs, and
the port's "offloads" in vhu's stats JSON), a 32 MiB TCP transfer arrives
with the same md5, and the stats show large (GSO) frames forwarded as they
are. Both without (QEMU csum=off,guest_csum=off,...): the same transfer,
no GSO frame. One with and one without, both directions: vhu segments the
large frames for the guest that cannot take them, md5 equal, no frame
dropped (elsewhere a full receive ring may drop one: counted, TCP resends).
"""
import pytest

import time

from tests.test_guests import IP_A, IP_B, Pair, wait_counters

pytestmark = pytest.mark.peers("qemu")

SIZE = 32 << 20
# Feature bits in /sys/class/net/eth0/device/features (one character per bit).
BITS = {"CSUM": 0, "GUEST_CSUM": 1, "GUEST_TSO4": 7, "GUEST_TSO6": 8, "HOST_TSO4": 11,
        "HOST_TSO6": 12}
WANTED = {"CSUM", "GUEST_CSUM", "HOST_TSO4", "GUEST_TSO4"}
NO_OFFLOADS = {k: "off" for k in ("csum", "guest_csum", "gso", "guest_tso4", "guest_tso6",
                                  "guest_ecn", "guest_ufo", "host_tso4", "host_tso6", "host_ecn",
                                  "host_ufo")}
RINGS = {"rx_queue_size": "1024", "tx_queue_size": "1024"}


class OffloadPair(Pair):
    """A patch pair whose guests each have offloads or not."""

    def __init__(self, a_offloads, b_offloads, vhu_args=()):
        super().__init__(vhu_args=list(vhu_args))
        self.offloads = {"a": a_offloads, "b": b_offloads}

    def guest(self, which, **kw):
        opts = dict(RINGS, **({} if self.offloads[which] else NO_OFFLOADS))
        return super().guest(which, device_opts=opts, **kw)


def transfer(src, dst, dst_ip, port, size):
    """size random bytes src -> dst over TCP (busybox nc), md5 and size
    compared on both ends (tests.test_guests.transfer, with the deadlines of
    32 MiB on TCG guests). Prints the time the send took."""
    src.run(f"dd if=/dev/urandom of=/tmp/tx bs=65536 count={size // 65536} 2>/dev/null",
            check=True, timeout=120)
    sent_size, sent_md5 = src.size_and_md5("/tmp/tx")
    assert sent_size == size
    dst.run(f"rm -f /tmp/rx; sleep 1200 | nc -l -p {port} > /tmp/rx &", check=True)
    dst.run(f"i=0; while ! grep -q ':{port:04X} 00000000:0000 0A' /proc/net/tcp && [ $i -lt 50 ]; "
            f"do sleep 0.1; i=$((i+1)); done", check=True)
    t0 = time.monotonic()
    out, rc = src.run(f"nc {dst_ip} {port} < /tmp/tx", timeout=900)
    assert rc == 0, out
    print(f"{size >> 20} MiB to {dst_ip} in {time.monotonic() - t0:.1f} s")
    dst.run("i=0; while pidof nc >/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; "
            "killall sleep; wait", timeout=120)
    got_size, got_md5 = dst.size_and_md5("/tmp/rx")
    assert got_size == size, f"received {got_size} of {size} bytes"
    assert got_md5 == sent_md5
    return got_size


def negotiated(g):
    out, rc = g.run("cat /sys/class/net/eth0/device/features")
    assert rc == 0, out
    bits = [line for line in out.split() if set(line) <= {"0", "1"} and len(line) >= 32][-1]
    return {name for name, bit in BITS.items() if bits[bit] == "1"}


def offload_stats(vhu, port):
    return vhu.port(port)["offload"]


def assert_no_drops_but_full_rings(vhu):
    for port in (0, 1):
        p = vhu.port(port)
        others = {k: v for k, v in p["drops_by_reason"].items() if k != "rx_no_room" and v}
        assert others == {} and p["broken"] == {}, p
        print(f"port {port}: {p['drops_by_reason']['rx_no_room']} frames found a full RX ring")


def pair_of(a, b, args=()):
    p = OffloadPair(a, b, args).start()
    return p


@pytest.fixture(scope="module")
def both_on():
    p = pair_of(True, True)
    yield p
    p.close()


def test_guests_negotiate_offloads_and_stats_say_so(both_on):
    for port, g in enumerate((both_on.a, both_on.b)):
        assert WANTED <= negotiated(g)
        assert WANTED <= set(both_on.vhu.port(port)["offloads"]), both_on.vhu.port(port)


def test_32mib_tcp_with_tso_both_ways(both_on):
    p = both_on
    assert transfer(p.a, p.b, IP_B, port=5011, size=SIZE) == SIZE
    wait_counters(p.vhu)
    a, b = offload_stats(p.vhu, 0), offload_stats(p.vhu, 1)
    # a's large frames went to b as they are: no software segmentation.
    assert a["tx_gso"] > 0 and b["rx_gso"] >= a["tx_gso"] and b["rx_segmented"] == 0, (a, b)
    assert transfer(p.b, p.a, IP_A, port=5012, size=SIZE) == SIZE
    assert_no_drops_but_full_rings(p.vhu)


@pytest.fixture(scope="module")
def mixed():
    p = pair_of(True, False)
    yield p
    p.close()


def test_mixed_guests_both_directions(mixed):
    p = mixed
    assert WANTED <= negotiated(p.a) and negotiated(p.b) == set()
    assert p.vhu.port(1)["offloads"] == []
    assert transfer(p.a, p.b, IP_B, port=5021, size=SIZE) == SIZE
    wait_counters(p.vhu)
    a, b = offload_stats(p.vhu, 0), offload_stats(p.vhu, 1)
    assert a["tx_gso"] > 0 and b["rx_segmented"] == a["tx_gso"] and b["rx_gso"] == 0, (a, b)
    assert transfer(p.b, p.a, IP_A, port=5022, size=SIZE) == SIZE
    assert offload_stats(p.vhu, 1)["tx_gso"] == 0 and offload_stats(p.vhu, 1)["tx_csum"] == 0
    assert_no_drops_but_full_rings(p.vhu)
    # With 1024-entry rings not even a full ring dropped a frame here.
    assert p.vhu.port(0)["drops"] == 0 and p.vhu.port(1)["drops"] == 0, p.vhu.stats()


@pytest.fixture(scope="module")
def both_off():
    p = pair_of(False, False)
    yield p
    p.close()


def test_32mib_tcp_without_offloads(both_off):
    p = both_off
    assert negotiated(p.a) == set() and negotiated(p.b) == set()
    assert transfer(p.a, p.b, IP_B, port=5031, size=SIZE) == SIZE
    assert transfer(p.b, p.a, IP_A, port=5032, size=SIZE) == SIZE
    wait_counters(p.vhu)
    for port in (0, 1):
        assert set(offload_stats(p.vhu, port).values()) == {0}
    assert_no_drops_but_full_rings(p.vhu)


def test_offloads_off_flag_offers_none():
    """--offloads off: guests that would take them negotiate none."""
    p = pair_of(True, True, ["--offloads", "off"])
    try:
        assert negotiated(p.a) == set() and p.vhu.port(0)["offloads"] == []
        assert transfer(p.a, p.b, IP_B, port=5041, size=4 << 20) == 4 << 20
        wait_counters(p.vhu)
        assert offload_stats(p.vhu, 0)["tx_gso"] == 0
    finally:
        p.close()
