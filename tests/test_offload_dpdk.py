"""Offloads against DPDK virtio-user: testpmd's csum forwarding engine
sends real TSO and partial-checksum frames through vhu --app patch to a
front-end that negotiated none of the guest offloads, and what arrives is
segmented and checksummed.

Sender: testpmd with a pcap port (rx_pcap: TCP/IPv4 and TCP/IPv6 frames of
up to 40 KB, UDP frames, every checksum wrong on purpose) and a virtio-user
port on vhu's socket a. ``--forward-mode=csum`` with ``csum set tcp hw``,
``csum set udp hw`` and ``tso set MSS`` on the virtio-user port, so the
virtio PMD puts NEEDS_CSUM and GSO_TCPV4/V6 headers on the ring (as a
guest's kernel does), with only the pseudo-header sum in the L4 checksum.

Receiver: a second testpmd, virtio-user on socket b (no rx offloads
configured: DPDK's virtio PMD then negotiates neither GUEST_CSUM nor
GUEST_TSO) forwarding (io) into a tx_pcap file, which dpkt reads back:
every segment is at most MSS, every IPv4 header and TCP/UDP checksum
verifies, the segments' sequence numbers follow on and their payloads
concatenate to the original's, and vhu's counters say it segmented and
finished what it was given.
"""
import os
import struct

import dpkt
import pytest

from tests.test_offload import assert_l4_checksum
from tests.vhuproc import VhuMaster, wait_until
from vhu.testbed.dpdk import Testpmd, pmd_installed, virtio_user_vdev

Testpmd.__test__ = False

pytestmark = pytest.mark.peers("testpmd")
VHU_CPU, PEER_CPU = "0", 1
MSS = 1200
RING = 1024          # the receiver's ring: room for every segment at once
MAC_TX, MAC_RX = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
SRC4, DST4 = bytes([10, 9, 0, 1]), bytes([10, 9, 0, 2])
SRC6, DST6 = bytes.fromhex("fd00" + "00" * 13 + "01"), bytes.fromhex("fd00" + "00" * 13 + "02")
# (IP version, L4 protocol, payload bytes): one flow (source port) each
FRAMES = [(4, 6, 40000), (4, 6, 9000), (4, 6, 2401), (6, 6, 30000), (6, 6, 5000),
          (4, 17, 1400), (6, 17, 900), (4, 6, 20000)]
FIN, PSH, ACK = 1, 8, 16


def frame(version, proto, payload, sport):
    """An Ethernet frame with its IP and L4 checksums deliberately wrong:
    testpmd's csum engine must have them computed (by vhu, for the virtio
    port)."""
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, 5201, 1000 * sport, 77, 5 << 4, ACK | PSH | FIN,
                         65000, 0xBAD, 0) + payload
    else:
        l4 = struct.pack("!HHHH", sport, 5201, 8 + len(payload), 0xBAD) + payload
    if version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), sport, 0x4000, 64, proto, 0xBAD,
                         SRC4, DST4)
        ether_type = b"\x08\x00"
    else:
        ip = struct.pack("!IHBB", 0x60000000, len(l4), proto, 64) + SRC6 + DST6
        ether_type = b"\x86\xdd"
    return MAC_RX + MAC_TX + ether_type + ip + l4


def write_pcap(path, frames):
    with open(path, "wb") as f:
        w = dpkt.pcap.Writer(f, snaplen=65535)
        for fr in frames:
            w.writepkt(fr, ts=0)


def read_pcap(path):
    with open(path, "rb") as f:
        return [bytes(buf) for _, buf in dpkt.pcap.Reader(f)]


def l4_of(fr):
    """(version, source port, IP id or None, L4 header+payload) of a frame."""
    if fr[12:14] == b"\x08\x00":
        ihl = (fr[14] & 15) * 4
        return 4, struct.unpack("!H", fr[14 + ihl:16 + ihl])[0], \
            struct.unpack("!H", fr[18:20])[0], fr[14 + ihl:14 + struct.unpack("!H", fr[16:18])[0]]
    return 6, struct.unpack("!H", fr[54:56])[0], None, fr[54:54 + struct.unpack("!H", fr[18:20])[0]]


@pytest.fixture
def pcap_pmd():
    """DPDK's net_pcap plugin (Debian's librte-net-pcap23), which
    scripts/setup-peers.sh installs: a machine without it is not set up."""
    assert pmd_installed("librte_net_pcap.so"), \
        "DPDK's net_pcap plugin is missing: run scripts/setup-peers.sh (librte-net-pcap23)"


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.usefixtures("pcap_pmd")
def test_testpmd_tso_and_csum_frames_arrive_segmented_and_checksummed(tmp_path, packed):
    originals = {}
    for i, (version, proto, size) in enumerate(FRAMES):
        originals[40000 + i] = (version, proto, os.urandom(size))
    write_pcap(tmp_path / "in.pcap", [frame(v, p, pl, sport)
                                       for sport, (v, p, pl) in originals.items()])
    write_pcap(tmp_path / "none.pcap", [])
    out = tmp_path / "out.pcap"
    with VhuMaster(tmp_path, "--app", "patch", "--cpus", VHU_CPU, "--poll", "busy",
                   sockets=("a.sock", "b.sock")) as vhu:
        rx = Testpmd([virtio_user_vdev(vhu.sockets[1], 0, packed_vq=packed, queue_size=RING),
                      f"net_pcap1,rx_pcap={tmp_path / 'none.pcap'},tx_pcap={out}"],
                     forward_mode="io", cpus=PEER_CPU, huge=False, rxd=RING, txd=RING)
        tx = Testpmd([f"net_pcap0,rx_pcap={tmp_path / 'in.pcap'},tx_pcap={tmp_path / 'back.pcap'}",
                      virtio_user_vdev(vhu.sockets[0], 1, packed_vq=packed)],
                     forward_mode="csum", cpus=PEER_CPU, huge=False, extra_args=["--no-flush-rx"])
        with rx, tx:
            rx.wait_link_up(0)
            rx.start()
            tx.wait_link_up(1)
            for line in ("port stop 1", "csum set ip sw 1", "csum set tcp hw 1",
                         "csum set udp hw 1", f"tso set {MSS} 1", "port start 1"):
                reply = tx.cmd(line)
                assert "not supported" not in reply and "Error" not in reply, (line, reply)
            tx.wait_link_up(1)
            tx.start()
            tso = sum(1 for v, p, pl in originals.values() if p == 6)
            wait_until(lambda: vhu.port(0)["offload"]["tx_gso"] >= tso, 30, "the TSO frames")
            want = sum(-(-len(pl) // MSS) if p == 6 else 1 for v, p, pl in originals.values())
            wait_until(lambda: vhu.port(1)["tx_packets"] >= want, 30, "every segment delivered")
            # ... and taken off the ring by the receiving testpmd, before it stops
            wait_until(lambda: rx.port_stats()[0]["rx_packets"] >= want, 30,
                       "the receiving testpmd to take every segment")
            tx.stop()
            got = rx.stop()
            a, b = vhu.port(0), vhu.port(1)       # while both are connected
        print("sender offload", a["offload"], "receiver", b["offload"], "rx testpmd", got)
        assert a["offload"]["tx_gso"] == tso and a["offload"]["tx_csum"] == len(FRAMES) - tso
        assert b["offload"]["rx_segmented"] == tso
        assert b["offload"]["rx_csum_done"] == len(FRAMES) - tso
        assert b["tx_packets"] == want and b["drops_by_reason"]["rx_no_room"] == 0, b
        assert got[0]["rx_packets"] == want
        # what each side negotiated: the sender DPDK's TX offloads, the
        # receiver none (so vhu had to do the work)
        assert {"CSUM", "HOST_TSO4", "HOST_TSO6"} <= set(a["offloads"])
        assert not any(o.startswith("GUEST_") for o in b["offloads"]), b["offloads"]
    frames = read_pcap(out)
    assert len(frames) == want
    flows = {}
    for fr in frames:
        version, sport, ip_id, l4 = l4_of(fr)
        orig_version, proto, _ = originals[sport]
        assert proto == 17 or len(l4) <= 20 + MSS
        assert version == orig_version
        assert_l4_checksum(fr, version == 6, proto)
        flows.setdefault(sport, []).append((ip_id, l4))
    assert set(flows) == set(originals)
    for sport, segs in flows.items():
        version, proto, payload = originals[sport]
        if proto == 17:
            assert len(segs) == 1 and segs[0][1][8:] == payload
            continue
        segs.sort(key=lambda s: struct.unpack("!I", s[1][4:8])[0])
        assert len(segs) == -(-len(payload) // MSS)
        data = b""
        for k, (ip_id, tcp) in enumerate(segs):
            seq, = struct.unpack("!I", tcp[4:8])
            assert seq == 1000 * sport + len(data)
            flags = tcp[13]
            last = k == len(segs) - 1
            assert flags == (ACK | PSH | FIN if last else ACK), (k, flags)
            if ip_id is not None:
                assert ip_id == (sport + k) & 0xFFFF
            body = tcp[(tcp[12] >> 4) * 4:]
            assert len(body) == (MSS if not last else len(payload) - MSS * k)
            data += body
        assert data == payload
