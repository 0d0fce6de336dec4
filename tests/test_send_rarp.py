"""SEND_RARP end to end: after a migration QEMU asks the back-end to announce
the guest's MAC (when the guest cannot announce itself). vhu sends a
broadcast RARP frame as if that guest had sent it: here through `--app
patch --pcap DIR`, so it reaches the guest on the other port and the
capture of both directions.
"""
import threading
import time

import dpkt
import pytest

import vhu.frontend.device as fe_device
from tests.vhuproc import VhuMaster
from vhu.frontend import Frontend
from vhu.ports import rarp_frame
from vhu.protocol.messages import U64, ProtocolFeature as PF, Request as R

MAC = bytes.fromhex("525400aabbcc")


def test_rarp_frame_layout():
    f = rarp_frame(MAC)
    assert len(f) == 60 and f[:6] == b"\xff" * 6 and f[6:12] == MAC and f[12:14] == b"\x80\x35"
    arp = dpkt.arp.ARP(f[14:42])
    assert (arp.hrd, arp.pro, arp.hln, arp.pln, arp.op) == (1, 0x800, 6, 4, 3)
    assert arp.sha == MAC and arp.tha == MAC and arp.spa == arp.tpa == bytes(4)


def read_pcap(path):
    with open(path, "rb") as f:
        return [bytes(buf) for _, buf in dpkt.pcap.Reader(f)]


def test_send_rarp_reaches_the_other_port(tmp_path, monkeypatch):
    monkeypatch.setattr(fe_device, "PROTOCOL_WANTED", fe_device.PROTOCOL_WANTED | 1 << PF.RARP)
    pcap = tmp_path / "pcap"
    pcap.mkdir()
    with VhuMaster(tmp_path, "--app", "patch", "--pcap", str(pcap), "--log-level", "info",
                   sockets=("a.sock", "b.sock")) as vhu:
        with Frontend(vhu.sockets[0]) as a, Frontend(vhu.sockets[1]) as b:
            assert a.protocol_features & 1 << PF.RARP
            # b's guest has receive buffers posted (its rx loop runs) before the announcement
            result = {}
            rx = threading.Thread(target=lambda: result.update(got=b.run("rx", count=1, duration=5)))
            rx.start()
            time.sleep(0.5)
            a.client.request(R.SEND_RARP, U64(int.from_bytes(MAC + b"\0\0", "little")).pack())
            rx.join()
            got = result["got"]
            assert got.rx_packets == 1 and got.rx_bytes == 60
            # a multicast "MAC" is refused (a failure reply, the connection stays)
            with pytest.raises(Exception):
                a.client.request(R.SEND_RARP, U64(0x01).pack())
            assert a.client.get_features()
        vhu.wait_log("announcing 52:54:00:aa:bb:cc")
        assert vhu.wait_stable("tx_packets", port=1) == 1
        assert vhu.wait_stable("rx_packets", port=0) == 1
        vhu.stop()
    assert read_pcap(pcap / "0-rx.pcap") == [rarp_frame(MAC)]     # as from guest a
    assert read_pcap(pcap / "1-tx.pcap") == [rarp_frame(MAC)]     # into guest b
