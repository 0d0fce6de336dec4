"""Three QEMU Linux guests on one vhu ``--app switch``, captured with ``--pcap``.

Every guest pings the other two (the switch learns their MACs from ARP and
floods until it has), then a 4 MiB file goes over TCP between two guests
with md5 checked on both sides, while the third guest's port must see none
of that unicast traffic. The pcap files are read back with dpkt and tcpdump.

Needs QEMU, busybox-static and the Debian kernel (scripts/setup-peers.sh).
"""
import os
import shutil
import subprocess
import tempfile

import dpkt
import pytest

from tests.vhuproc import VhuMaster

from vhu.testbed.guest import Guest  # noqa: E402

pytestmark = pytest.mark.peers("qemu")
VHU_CPU, GUEST_CPU = "0", 1
BOOT_TIMEOUT = 120
FILE_SIZE = 4 << 20
NAMES = "abc"
IPS = {n: f"10.0.1.{i + 1}" for i, n in enumerate(NAMES)}
MACS = {n: f"52:54:00:00:01:0{i + 1}" for i, n in enumerate(NAMES)}


class _Dir:
    """Short socket paths (AF_UNIX limit), usable as VhuMaster's tmp_path."""

    def __init__(self):
        self.path = tempfile.mkdtemp(prefix="vhu-sw-")

    def __truediv__(self, name):
        return os.path.join(self.path, name)


@pytest.fixture(scope="module")
def switch():
    d = _Dir()
    pcap = d / "pcap"
    os.mkdir(pcap)
    vhu = VhuMaster(d, "--app", "switch", "--pcap", pcap, "--cpus", VHU_CPU,
                    sockets=[f"{n}.sock" for n in NAMES])
    guests, served = {}, False
    try:
        vhu.wait_sockets()
        vhu.wait_started()
        for n in NAMES:
            guests[n] = Guest(d / f"{n}.sock", ip=f"{IPS[n]}/24", mac=MACS[n], cpu=GUEST_CPU,
                              name=f"vhu-sw-{n}-{os.getpid()}", log_path=d / f"{n}.console").launch()
        for g in guests.values():
            g.wait_ready(BOOT_TIMEOUT)
        yield vhu, guests, pcap
        served = True
    finally:
        for g in guests.values():
            g.close()
        vhu.stop(check=served)      # the balance check, unless set-up failed
        shutil.rmtree(d.path, ignore_errors=True)



def read_pcap(path):
    with open(path, "rb") as f:
        r = dpkt.pcap.Reader(f)
        assert r.datalink() == dpkt.pcap.DLT_EN10MB
        return [dpkt.ethernet.Ethernet(buf) for _, buf in r]


def test_three_guests_reach_each_other_and_tcp_checksums(switch):
    vhu, g, pcap = switch
    for src in NAMES:
        for dst in NAMES:
            if src != dst:
                res = g[src].ping(IPS[dst], count=5, interval=0.2, deadline=20)
                assert res["received"] == 5, (src, dst, res["output"])
    before_c = vhu.port(2)["tx_bytes"]
    # 4 MiB a -> b over TCP, md5 on both sides.
    a, b = g["a"], g["b"]
    a.run(f"dd if=/dev/urandom of=/tmp/tx bs=65536 count={FILE_SIZE // 65536} 2>/dev/null",
          check=True, timeout=60)
    sent = a.size_and_md5("/tmp/tx")
    b.run("rm -f /tmp/rx; sleep 600 | nc -l -p 5001 > /tmp/rx &", check=True)
    b.run("i=0; while ! grep -q ':1389 00000000:0000 0A' /proc/net/tcp && [ $i -lt 50 ]; "
          "do sleep 0.1; i=$((i+1)); done", check=True)
    out, rc = a.run(f"nc {IPS['b']} 5001 < /tmp/tx", timeout=180)
    assert rc == 0, out
    b.run("i=0; while pidof nc >/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; "
          "killall sleep; wait", timeout=60)
    assert b.size_and_md5("/tmp/rx") == sent == (FILE_SIZE, sent[1])
    # Learned unicast is not flooded: c saw (almost) nothing of the 4 MiB.
    assert vhu.port(2)["tx_bytes"] - before_c < FILE_SIZE // 20, vhu.stats()
    for p in range(3):
        assert vhu.port(p)["tx_packets"] > 0 and vhu.port(p)["rx_packets"] > 0

    # The captures: a's ICMP echo requests to c are in a's rx file and c's tx
    # file, never in b's tx file; the TCP payload bytes are in b's tx file.
    vhu.stop()     # flushes the files
    def icmp_to(frames, ip):
        return [f for f in frames if isinstance(f.data, dpkt.ip.IP) and
                isinstance(f.data.data, dpkt.icmp.ICMP) and f.data.dst == bytes(map(int, ip.split(".")))
                and f.data.data.type == dpkt.icmp.ICMP_ECHO]
    a_rx, b_tx, c_tx = (read_pcap(os.path.join(pcap, f)) for f in ("0-rx.pcap", "1-tx.pcap", "2-tx.pcap"))
    assert len(icmp_to(a_rx, IPS["c"])) == 5
    assert len(icmp_to(c_tx, IPS["c"])) >= 5
    assert icmp_to(b_tx, IPS["c"]) == []
    payload = sum(len(f.data.data.data) for f in b_tx if isinstance(f.data, dpkt.ip.IP)
                  and isinstance(f.data.data, dpkt.tcp.TCP) and f.data.data.dport == 5001)
    assert payload >= FILE_SIZE
    if shutil.which("tcpdump"):
        out = subprocess.run(["tcpdump", "-nr", os.path.join(pcap, "0-rx.pcap"), "icmp"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.count(f"> {IPS['c']}: ICMP echo request") == 5
