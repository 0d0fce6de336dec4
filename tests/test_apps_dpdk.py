"""--app switch and pcap captures against DPDK testpmd (virtio-user, --no-huge).

Counts are exact: what testpmd sent, what vhu counted, what each receiver
got plus what vhu dropped for want of room, and what the pcap files hold
(read back with dpkt, an independent reader, and tcpdump when installed).
"""
import shutil
import subprocess

import dpkt
import pytest

from tests.vhuproc import VhuMaster
from vhu.testbed.dpdk import Testpmd, virtio_user_vdev

Testpmd.__test__ = False

pytestmark = pytest.mark.peers("testpmd")
VHU_CPU, PEER_CPU = "0", 1


def front_ends(socks, mode, queues=1, packed=False):
    return Testpmd([virtio_user_vdev(s, i, queues=queues, packed_vq=packed)
                    for i, s in enumerate(socks)],
                   forward_mode=mode, cpus=PEER_CPU, huge=False, rxq=queues, txq=queues)


def pcap_records(path):
    with open(path, "rb") as f:
        r = dpkt.pcap.Reader(f)
        assert r.datalink() == dpkt.pcap.DLT_EN10MB and r.snaplen == 65535
        return [bytes(buf) for _, buf in r]


def tcpdump_count(path):
    out = subprocess.run(["tcpdump", "-nr", path], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return len(out.stdout.splitlines())


def test_pcap_sink_captures_exactly_what_testpmd_sent(tmp_path):
    cap = tmp_path / "cap"
    cap.mkdir()
    with VhuMaster(tmp_path, "--app", "pcap", "--pcap", cap, "--cpus", VHU_CPU) as vhu:
        with front_ends(vhu.sockets, "txonly") as tp:
            tp.wait_link_up(0)
            sent = tp.run_for(0.1)[0]["tx_packets"]     # some 10^5 frames: files stay small
            got = vhu.wait_stable("rx_packets")
        assert got == sent > 1000
        vhu.stop()                            # workers flush and close their files
    frames = pcap_records(cap / "0-rx.pcap")
    assert len(frames) == sent
    assert {len(f) for f in frames} == {64}   # testpmd txonly: 64-byte IPv4/UDP frames
    eth = dpkt.ethernet.Ethernet(frames[0])
    assert eth.type == dpkt.ethernet.ETH_TYPE_IP and isinstance(eth.data.data, dpkt.udp.UDP)
    assert pcap_records(cap / "0-tx.pcap") == []
    if shutil.which("tcpdump"):
        assert tcpdump_count(str(cap / "0-rx.pcap")) == sent


@pytest.mark.parametrize("queues,packed", [(1, False), (2, False), (1, True)],
                         ids=["1q", "2q", "packed"])
def test_switch_floods_unknown_unicast_to_every_other_port(tmp_path, queues, packed):
    """txonly's destination (--eth-peer default) is never a source: flooded
    to both other ports, never back to the sender; every frame is either
    delivered (and counted by the receiving testpmd) or counted as no room.
    With two queue pairs, two workers switch a queue pair each and write
    their own pcap files."""
    cap = tmp_path / "cap"
    cap.mkdir()
    with VhuMaster(tmp_path, "--app", "switch", "--pcap", cap, "--cpus", VHU_CPU,
                   "--queues", queues, "--workers", queues,
                   sockets=("a.sock", "b.sock", "c.sock")) as vhu:
        with front_ends(vhu.sockets[1:], "rxonly", queues, packed) as rx, \
                front_ends(vhu.sockets[:1], "txonly", queues, packed) as tx:
            rx.wait_link_up(0)
            rx.wait_link_up(1)
            tx.wait_link_up(0)
            rx.start()
            sent = tx.run_for(0.3)[0]["tx_packets"]
            assert vhu.wait_stable("rx_packets", 0) == sent > 1000
            vhu.wait_stable("tx_packets", 2)
            got = rx.stop()
        ports = [vhu.port(i) for i in range(3)]
        assert ports[0]["tx_packets"] == 0, "never back to the in-port"
        for p in (1, 2):
            assert ports[p]["tx_packets"] == got[p - 1]["rx_packets"]
            assert ports[p]["tx_packets"] + ports[p]["drops_by_reason"]["rx_no_room"] == sent
        assert got[0]["rx_packets"] > 0 and got[1]["rx_packets"] > 0
        if queues > 1:
            assert all(q["rx_packets"] for q in ports[0]["queues"]), "both queue pairs carried frames"
        vhu.stop()

    def records(port, direction):
        if queues == 1:
            return len(pcap_records(cap / f"{port}-{direction}.pcap"))
        return sum(len(pcap_records(cap / f"{port}-{direction}-w{w}.pcap")) for w in range(queues))
    assert records(0, "rx") == sent
    for p in (1, 2):
        assert records(p, "tx") == ports[p]["tx_packets"]
