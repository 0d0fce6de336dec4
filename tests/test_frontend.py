"""vhu.frontend against vhu.master (a subprocess, as users run it), its CLI, and vhu.demo.

Counts are checked from both ends: what the front-end says it sent or got,
and what vhu's stats file says it received or delivered.
"""
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.vhuproc import REPO, VhuMaster, frontend_process
from vhu._mem import live_mappings
from vhu.frontend import Frontend, FrontendError
from vhu.frontend.__main__ import UsageError, parse_args
from vhu.protocol.messages import VirtioFeature as VF

SUMMARY = re.compile(r"summary: (\w+) [\d.]+ s \| tx (\d+) packets (\d+) bytes [\d.]+ Mpps [\d.]+ Gbps"
                     r" \| rx (\d+) packets (\d+) bytes [\d.]+ Mpps [\d.]+ Gbps \| errors (\d+)")


def cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "vhu.frontend", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def summary(text):
    m = SUMMARY.search(text)
    assert m, text
    mode, tx, txb, rx, rxb, err = m.groups()
    return mode, int(tx), int(txb), int(rx), int(rxb), int(err)


# -- command line, no sockets ------------------------------------------------------

def test_parse_defaults_and_flags():
    o = parse_args(["--socket", "/s"])
    assert (o.mode, o.pkt_size, o.queues, o.duration, o.count, o.listen) == ("tx", 64, 1, None, 0, False)
    o = parse_args(["--socket", "/s", "--listen", "--mode", "loop", "--pkt-size", "1500",
                    "--queues", "4", "--duration", "2.5", "--count", "9", "--packed",
                    "--ring-size", "100"])
    assert (o.listen, o.mode, o.pkt_size, o.queues, o.duration, o.count, o.packed, o.ring_size) == \
        (True, "loop", 1500, 4, 2.5, 9, True, 100)


@pytest.mark.parametrize("argv", [
    [], ["--socket", "/s", "--mode", "rxtx"], ["--socket", "/s", "--pkt-size", "20"],
    ["--socket", "/s", "--queues", "0"], ["--socket", "/s", "--duration", "0"],
    ["--socket", "/s", "--ring-size", "100"], ["--socket", "/s", "--legacy", "--packed"],
    ["--socket", "/s", "--legacy", "--queues", "2"], ["--socket", "/s", "--count", "-1"],
])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(UsageError):
        parse_args(argv)


def test_api_refuses_contradictions():
    with pytest.raises(ValueError, match="legacy"):
        Frontend("/s", legacy=True, packed=True)
    with pytest.raises(ValueError, match="RING_PACKED"):
        Frontend("/s", features=1 << VF.VERSION_1 | 1 << VF.RING_PACKED)
    with pytest.raises(ValueError):
        Frontend("/s", ring_size=100)          # split rings: a power of two
    with pytest.raises(ValueError):
        Frontend("/s", pkt_size=59)


def test_cli_bad_argument_exits_2_with_one_line():
    r = cli("--socket", "/nonexistent.sock", "--mode", "bogus")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--mode" in r.stderr


def test_cli_no_backend_exits_1_with_one_line(tmp_path):
    r = cli("--socket", tmp_path / "none.sock", "--timeout", "0.3")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "cannot connect" in r.stderr


def test_backend_that_hangs_up_is_a_clear_error(tmp_path):
    """A back-end that closes the connection at once: FrontendError, nothing leaks."""
    path = str(tmp_path / "rude.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def rude():
        c, _ = srv.accept()
        c.recv(64)
        c.close()
    t = threading.Thread(target=rude)
    t.start()
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(FrontendError, match="closed the connection|gone"):
        with Frontend(path, timeout=5):
            pass
    t.join()
    srv.close()
    assert set(os.listdir("/proc/self/fd")) - before == set()


# -- against vhu.master ----------------------------------------------------------

def test_tx_into_sink_counts_exactly(tmp_path):
    with VhuMaster(tmp_path, "--app", "sink") as vhu:
        with Frontend(vhu.sockets[0]) as fe:
            r = fe.run("tx", count=50_000, duration=60)
        assert (r.tx_packets, r.tx_bytes, r.errors) == (50_000, 64 * 50_000, 0)
        assert vhu.wait_stable("rx_packets") == 50_000
        assert vhu.port()["rx_bytes"] == 64 * 50_000
        vhu.stop()


def test_loop_through_echo_every_frame_back_intact_and_vring_bases(tmp_path):
    with VhuMaster(tmp_path, "--app", "echo") as vhu:
        with Frontend(vhu.sockets[0], pkt_size=300) as fe:
            r = fe.run("loop", duration=1.5)
            bases = fe.stop()
        assert r.tx_packets > 1000 and r.rx_packets == r.tx_packets, r.summary()
        assert (r.corrupt, r.missing, r.out_of_order) == (0, 0, 0), r.summary()
        assert r.rx_bytes == 300 * r.rx_packets
        # GET_VRING_BASE: the next avail entry the back-end would process: every
        # TX frame, and every RX buffer it filled (the ones still posted are not).
        assert bases[1] == r.tx_packets & 0xFFFF
        assert bases[0] == r.rx_packets & 0xFFFF
        assert vhu.wait_stable("tx_packets") == r.rx_packets
        assert vhu.port()["rx_packets"] == r.tx_packets
        vhu.stop()


def test_rx_from_source(tmp_path):
    with VhuMaster(tmp_path, "--app", "source", "--pkt-size", "128") as vhu:
        with Frontend(vhu.sockets[0]) as fe:
            r = fe.run("rx", count=20_000, duration=60)
        assert (r.rx_packets, r.rx_bytes, r.tx_packets) == (20_000, 128 * 20_000, 0)
        assert vhu.wait_stable("tx_packets") == 20_000
        vhu.stop()


def test_rx_frames_merged_over_several_buffers(tmp_path):
    """4000-byte frames into 2 KiB receive buffers (MRG_RXBUF): each frame spans
    two buffers and counts once, with all its bytes; the count stays exact."""
    with VhuMaster(tmp_path, "--app", "source", "--pkt-size", "4000") as vhu:
        with Frontend(vhu.sockets[0]) as fe:
            assert fe.rx_slot < 4000 + fe.hdr_len
            r = fe.run("rx", count=3000, duration=60)
        assert (r.rx_packets, r.rx_bytes, r.errors) == (3000, 4000 * 3000, 0), r.summary()
        assert vhu.wait_stable("tx_packets") == 3000
        vhu.stop()


@pytest.mark.parametrize("poll", ["busy", "epoll"])
def test_kicks_only_when_the_backend_asks(tmp_path, poll):
    """A busy-polling back-end asks for no kicks (EVENT_IDX): almost none are
    sent. A sleeping (epoll) one needs them to wake: frames still all arrive."""
    with VhuMaster(tmp_path, "--app", "sink", "--poll", poll) as vhu:
        with Frontend(vhu.sockets[0]) as fe:
            r = fe.run("tx", count=50_000, duration=60)
        assert r.tx_packets == 50_000 and vhu.wait_stable("rx_packets") == 50_000
        vhu.stop()
    assert r.kicks >= 1
    if poll == "busy":
        assert r.kicks < r.tx_packets / 100, r


def test_legacy_peer_ten_byte_header(tmp_path):
    with VhuMaster(tmp_path, "--app", "echo") as vhu:
        with Frontend(vhu.sockets[0], legacy=True) as fe:
            assert fe.hdr_len == 10
            assert not fe.features & (1 << VF.VERSION_1 | 1 << VF.MRG_RXBUF | 1 << VF.PROTOCOL_FEATURES)
            r = fe.run("loop", duration=1.0)
        assert r.tx_packets > 0 and r.rx_packets == r.tx_packets and r.errors == 0, r.summary()
        assert vhu.wait_stable("rx_packets") == r.tx_packets
        assert "net header 10 bytes" in vhu.output()
        vhu.stop()


def test_two_queue_pairs_both_carry_traffic(tmp_path):
    with VhuMaster(tmp_path, "--app", "echo", "--queues", "2", "--workers", "2") as vhu:
        with Frontend(vhu.sockets[0], queues=2) as fe:
            r = fe.run("loop", duration=1.5)
        assert r.tx_packets > 0 and r.rx_packets == r.tx_packets and r.errors == 0, r.summary()
        assert vhu.wait_stable("rx_packets") == r.tx_packets
        assert all(q["rx_packets"] > 0 for q in vhu.port()["queues"]), vhu.port()
        vhu.stop()


def test_packed_rings_against_vhu(tmp_path):
    with VhuMaster(tmp_path, "--app", "echo") as vhu:
        with Frontend(vhu.sockets[0], packed=True, ring_size=100) as fe:
            assert fe.features >> VF.RING_PACKED & 1
            r = fe.run("loop", duration=1.0)
        assert r.tx_packets > 0 and r.rx_packets == r.tx_packets and r.errors == 0, r.summary()
        assert vhu.wait_stable("rx_packets") == r.tx_packets
        vhu.stop()


def test_adaptive_poll_sleeps_when_idle_and_still_moves_frames(tmp_path):
    """adaptive: with nothing to receive the front-end sleeps on its call
    eventfds (little CPU); with traffic, frames still all come back."""
    with VhuMaster(tmp_path, "--app", "echo") as vhu:
        with Frontend(vhu.sockets[0]) as fe:
            t0 = os.times()
            idle = fe.run("rx", duration=1.5, poll="adaptive")
            t1 = os.times()
            r = fe.run("loop", duration=1.0, poll="adaptive")
        vhu.stop()
    cpu = (t1.user + t1.system) - (t0.user + t0.system)
    assert idle.rx_packets == 0 and cpu < 0.5, f"{cpu:.2f} s of CPU in 1.5 s idle"
    assert r.tx_packets > 0 and r.rx_packets == r.tx_packets and r.errors == 0, r.summary()


def test_listen_for_a_client_mode_backend(tmp_path):
    sock = tmp_path / "fe.sock"
    with frontend_process("--socket", sock, "--listen", "--mode", "loop", "--count", 20000,
                          "--duration", 30, "--quiet") as fe:
        with VhuMaster(tmp_path, "--client", "--app", "echo", sockets=("fe.sock",)):
            out, err = fe.communicate(timeout=60)
    assert fe.returncode == 0, err
    mode, tx, _, rx, _, errors = summary(out)
    assert (mode, tx, rx, errors) == ("loop", 20000, 20000, 0)
    assert not sock.exists(), "the listening socket is removed at exit"


def test_close_releases_every_fd_and_mapping(tmp_path, no_fd_leak):
    maps = live_mappings()
    with VhuMaster(tmp_path, "--app", "echo") as vhu:
        fe = Frontend(vhu.sockets[0], queues=1)
        with fe:
            assert live_mappings() == maps + 1
            fe.run("loop", count=1000, duration=30)
        assert fe.client is None and fe.mem is None
        assert live_mappings() == maps
        vhu.stop()


def test_loop_reports_what_never_comes_back(tmp_path):
    """The checks can fail: a sink returns nothing, so every frame is missing (exit 1)."""
    with VhuMaster(tmp_path, "--app", "sink") as vhu:
        r = cli("--socket", vhu.sockets[0], "--mode", "loop", "--count", 1000, "--quiet")
        vhu.stop()
    assert r.returncode == 1
    mode, tx, _, rx, _, errors = summary(r.stdout)
    # At most an RX ring's worth is out at once (so an echo always has room);
    # a window with nothing back for 0.2 s is counted lost and the next goes.
    assert (tx, rx) == (1000, 0) and errors == 1000
    assert "missing 1000" in r.stdout


def test_loop_counts_foreign_frames_as_corrupt(tmp_path):
    """vhu's source fills our RX ring with its own frames: none passes the check."""
    with VhuMaster(tmp_path, "--app", "source") as vhu:
        with Frontend(vhu.sockets[0]) as fe:
            r = fe.run("loop", duration=0.5)
        vhu.stop()
    assert r.rx_packets > 0 and r.corrupt >= r.rx_packets - r.tx_packets > 0, r.summary()


def test_cli_tx_count_summary(tmp_path):
    with VhuMaster(tmp_path, "--app", "sink") as vhu:
        r = cli("--socket", vhu.sockets[0], "--mode", "tx", "--count", 10_000, "--pkt-size", 100)
        assert r.returncode == 0, r.stderr
        assert summary(r.stdout) == ("tx", 10_000, 1_000_000, 0, 0, 0)
        assert vhu.wait_stable("rx_packets") == 10_000
        vhu.stop()


def test_cli_runs_until_sigterm_then_summarizes(tmp_path):
    """No --duration or --count: runs until SIGTERM (or Ctrl-C), then drains,
    tears down and prints the summary; every frame it counts reached vhu."""
    import signal
    import time as _time
    with VhuMaster(tmp_path, "--app", "sink") as vhu:
        with frontend_process("--socket", vhu.sockets[0]) as p:
            deadline = _time.monotonic() + 30
            while vhu.port()["rx_packets"] == 0 and _time.monotonic() < deadline:
                _time.sleep(0.1)
            p.send_signal(signal.SIGTERM)
            out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        _, tx, _, _, _, errors = summary(out)
        assert tx > 0 and errors == 0
        assert vhu.wait_stable("rx_packets") == tx
        vhu.stop()


def test_demo_moves_frames():
    r = subprocess.run([sys.executable, "-m", "vhu.demo", "--seconds", "1"], cwd=REPO,
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    mode, tx, _, rx, _, errors = summary(r.stdout)
    assert tx > 0 and rx == tx and errors == 0
    assert f"vhu counted: received {tx} frames" in r.stdout
    assert "counts agree" in r.stdout


# -- a back-end that lies --------------------------------------------------------

class LyingBackend(threading.Thread):
    """Just enough vhost-user (VERSION_1 only: no protocol features, no acks) to
    get rings set up, then writes one bad used element: on the TX ring an id
    never made available, or on the RX ring a length past the buffer."""

    def __init__(self, path, lie):
        super().__init__(daemon=True)
        import mmap
        from vhu.protocol.messages import MemoryTable, Request, U64, VringAddr, VringState
        from vhu.protocol.wire import MessageReader, pack_reply
        self.m = (mmap, MemoryTable, Request, U64, VringAddr, VringState, MessageReader, pack_reply)
        self.lie = lie
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(1)
        self.srv.settimeout(20)

    def run(self):
        import array
        import struct
        mmap, MemoryTable, R, U64, VringAddr, VringState, MessageReader, pack_reply = self.m
        conn, _ = self.srv.accept()
        reader, mem, uva, addrs = MessageReader(), None, 0, {}
        def next_message():
            # One message at a time (header with its fds, then the payload):
            # fds stay with the message that carried them.
            hdr, anc, _, _ = conn.recvmsg(12, socket.CMSG_SPACE(8 * 4))
            fds = []
            for _, _, cdata in anc:
                a = array.array("i")
                a.frombytes(cdata[:len(cdata) - len(cdata) % 4])
                fds += list(a)
            if not hdr:
                return None, fds
            while len(hdr) < 12:
                more = conn.recv(12 - len(hdr))
                if not more:
                    return None, fds
                hdr += more
            payload = b""
            while len(payload) < struct.unpack("<III", hdr)[2]:
                more = conn.recv(struct.unpack("<III", hdr)[2] - len(payload))
                if not more:
                    return None, fds
                payload += more
            return hdr + payload, fds

        with conn:
            while True:
                data, fds = next_message()
                if not data:
                    for fd in fds:
                        os.close(fd)
                    break
                for msg in reader.feed(data, fds):
                    if msg.request == R.GET_FEATURES:
                        conn.sendall(pack_reply(R.GET_FEATURES, U64(1 << 32).pack()))
                    elif msg.request == R.SET_MEM_TABLE:
                        reg = MemoryTable.unpack(msg.payload).regions[0]
                        fd = msg.take_fds()[0]
                        mem, uva = mmap.mmap(fd, reg.memory_size), reg.userspace_addr
                        os.close(fd)
                    elif msg.request == R.SET_VRING_ADDR:
                        a = VringAddr.unpack(msg.payload)
                        addrs[a.index] = a
                    elif msg.request == R.GET_VRING_BASE:
                        s = VringState.unpack(msg.payload)
                        conn.sendall(pack_reply(R.GET_VRING_BASE, VringState(s.index, 0).pack()))
                    elif msg.request == R.SET_VRING_KICK and len(addrs) == 2 and self.lie == "id":
                        used = addrs[1].used_user_addr - uva          # TX ring
                        struct.pack_into("<II", mem, used + 4, 999, 0)  # id 999 > ring size
                        struct.pack_into("<H", mem, used + 2, 1)
                    msg.close_fds()
                if self.lie == "len" and len(addrs) == 2 and mem is not None:
                    break
            if self.lie == "len":
                # Wait for the RX ring's first buffer, then say we wrote 1 MiB into it.
                avail, used = addrs[0].avail_user_addr - uva, addrs[0].used_user_addr - uva
                while struct.unpack_from("<H", mem, avail + 2)[0] == 0:
                    time.sleep(0.01)
                head = struct.unpack_from("<H", mem, avail + 4)[0]
                struct.pack_into("<II", mem, used + 4, head, 1 << 20)
                struct.pack_into("<H", mem, used + 2, 1)
                while True:           # answer the teardown
                    data = conn.recv(4096)
                    if not data:
                        break
                    for msg in reader.feed(data):
                        if msg.request == R.GET_VRING_BASE:
                            s = VringState.unpack(msg.payload)
                            conn.sendall(pack_reply(R.GET_VRING_BASE, VringState(s.index, 0).pack()))
        reader.close()
        if mem is not None:
            mem.close()
        self.srv.close()


def test_backend_returning_an_id_never_made_available(tmp_path, no_fd_leak):
    be = LyingBackend(str(tmp_path / "liar.sock"), "id")
    be.start()
    with Frontend(str(tmp_path / "liar.sock")) as fe:
        assert fe.hdr_len == 12 and fe.features == 1 << 32
        with pytest.raises(FrontendError, match="not in flight"):
            fe.run("tx", duration=5)
    be.join(10)
    assert not be.is_alive()


def test_backend_claiming_more_bytes_than_the_buffer(tmp_path, no_fd_leak):
    be = LyingBackend(str(tmp_path / "liar.sock"), "len")
    be.start()
    with Frontend(str(tmp_path / "liar.sock")) as fe:
        r = fe.run("rx", duration=0.5)
    be.join(10)
    assert not be.is_alive()
    assert (r.rx_packets, r.rx_bytes, r.corrupt) == (0, 0, 1), r.summary()
