"""Real Linux guests (their own virtio-net driver) under QEMU 7.2 through vhu.master.

Two TCG guests are joined by ``--app patch`` like a cable; they ping each
other and move a 4 MiB file over TCP (busybox nc), checked by md5 on both
sides. Also: vhu as client (QEMU ``server=on``), two queue pairs, a guest
powered off and booted again on the same socket, and vhu.master SIGKILLed
and restarted under running guests, both ways QEMU allows it.

Needs QEMU, busybox-static and the Debian kernel (scripts/setup-peers.sh).
Missing: skipped with the reason, or failed under CI=true. vhu runs on CPU 0,
the guests on CPU 1.
"""
import os
import re
import shutil
import signal
import tempfile
import time

import pytest

from tests.vhuproc import VhuMaster
from vhu.testbed.procs import descendants

from vhu.testbed.guest import Guest  # noqa: E402  (needs nothing when skipped)

pytestmark = pytest.mark.peers("qemu")
VHU_CPU, GUEST_CPU = "0", 1
IP_A, IP_B = "10.0.0.1", "10.0.0.2"
MAC_A, MAC_B = "52:54:00:00:00:0a", "52:54:00:00:00:0b"
FILE_SIZE = 4 << 20
BOOT_TIMEOUT = 90


class Short:
    """A short temp dir (AF_UNIX paths are limited to 107 bytes) that
    VhuMaster can use like pytest's tmp_path."""

    def __init__(self):
        self.path = tempfile.mkdtemp(prefix="vhu-g-")

    def __truediv__(self, name):
        return os.path.join(self.path, name)

    def remove(self):
        shutil.rmtree(self.path, ignore_errors=True)


class Pair:
    """vhu.master --app patch with two sockets and a guest on each."""

    def __init__(self, vhu_args=(), queues=1, server=False, reconnect=None, smp=1, packed=False):
        self.dir = Short()
        self.vhu_args = ["--app", "patch", "--cpus", VHU_CPU, *vhu_args]
        if queues > 1:
            self.vhu_args += ["--queues", queues, "--workers", queues]
        self.guest_kw = dict(queues=queues, server=server, reconnect=reconnect, cpu=GUEST_CPU,
                             packed=packed, extra_args=["-smp", str(smp)] if smp > 1 else [])
        self.vhu = None
        self.a = self.b = None
        self.client = server         # QEMU listens: vhu connects

    def start_vhu(self):
        args = self.vhu_args + (["--client"] if self.client else [])
        # Started under running guests (a restart, or QEMU listening first):
        # no baseline to balance against, the guests are connected from the start.
        fresh = self.a is None and not self.client
        self.vhu = VhuMaster(self.dir, *args, sockets=("a.sock", "b.sock"), balance=fresh)
        if not self.client:
            self.vhu.wait_sockets()
        if fresh:
            self.vhu.wait_started()
        return self.vhu

    def guest(self, which, **kw):
        sock, ip, mac = ((self.dir / "a.sock", IP_A, MAC_A) if which == "a"
                         else (self.dir / "b.sock", IP_B, MAC_B))
        kw = dict(self.guest_kw, **kw)
        return Guest(sock, ip=f"{ip}/24", mac=mac, name=f"vhu-test-{which}-{os.getpid()}",
                     log_path=self.dir / f"{which}.console", **kw)

    def start(self):
        try:
            if self.client:          # QEMU listens first; vhu connects to it
                self.a = self.guest("a").launch()
                self.b = self.guest("b").launch()
                self.start_vhu()
            else:
                self.start_vhu()
                self.a = self.guest("a").launch()
                self.b = self.guest("b").launch()
            self.a.wait_ready(BOOT_TIMEOUT)
            self.b.wait_ready(BOOT_TIMEOUT)
            for g in (self.a, self.b):
                g.run("echo booted > /tmp/marker", check=True)
        except BaseException:
            self.close(check=False)  # a fixture that fails to start is never torn down
            raise
        return self

    def close(self, check=True):
        guests, self.a, self.b = (self.a, self.b), None, None
        for g in guests:
            if g is not None:
                g.close()
        vhu, self.vhu = self.vhu, None
        try:
            if vhu is not None:
                pids = worker_pids(vhu.proc.pid)
                vhu.stop(check=check)        # asserts exit 0 and (server mode) socket removed
                assert_gone(pids)
        finally:
            self.dir.remove()


@pytest.fixture(scope="module")
def pair():
    """Server-mode vhu; QEMU connects with reconnect=1 so the same pair also
    serves the vhu restart test."""
    p = Pair(reconnect=1).start()
    yield p
    p.close()


@pytest.fixture(scope="module")
def client_pair():
    p = Pair(server=True).start()
    yield p
    p.close()


# --------------------------------------------------------------------------- checks


def assert_ping(src, dst_ip, count=20, interval=0.2):
    res = src.ping(dst_ip, count=count, interval=interval)
    assert res["transmitted"] == count, res["output"]
    assert res["received"] == count and res["loss_pct"] == 0, res["output"]


def wait_ping(src, dst_ip, timeout=30):
    """Ping once per try until an answer comes; the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if src.ping(dst_ip, count=1, deadline=2)["received"] == 1:
            return time.monotonic() - t0
    pytest.fail(f"no ping answer from {dst_ip} within {timeout}s:\n{src.console[-2000:]}")



def transfer(src, dst, dst_ip, port=5001, size=FILE_SIZE):
    """size random bytes from src to dst over TCP with busybox nc; both
    sides' md5 and the received size are compared."""
    src.run(f"dd if=/dev/urandom of=/tmp/tx bs=65536 count={size // 65536} 2>/dev/null", check=True,
            timeout=60)
    sent_size, sent_md5 = src.size_and_md5("/tmp/tx")
    assert sent_size == size
    # The listener's stdin is a pipe that stays open: with /dev/null as stdin
    # busybox nc would half-close the connection at once and the sender
    # would quit on that EOF before sending everything.
    dst.run(f"rm -f /tmp/rx; sleep 600 | nc -l -p {port} > /tmp/rx &", check=True)
    dst.run(f"i=0; while ! grep -q ':{port:04X} 00000000:0000 0A' /proc/net/tcp && [ $i -lt 50 ]; "
            f"do sleep 0.1; i=$((i+1)); done", check=True)
    out, rc = src.run(f"nc {dst_ip} {port} < /tmp/tx", timeout=180)
    assert rc == 0, out
    out, rc = dst.run("i=0; while pidof nc >/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; "
                      "pidof nc; killall sleep; wait", timeout=60)
    got_size, got_md5 = dst.size_and_md5("/tmp/rx")
    assert got_size == size, f"received {got_size} of {size} bytes"
    assert got_md5 == sent_md5
    return got_size


def rx_tx(vhu, port):
    p = vhu.port(port)
    return p["rx_packets"], p["tx_packets"]


# --------------------------------------------------------------------------- server mode


def test_two_guests_ping_through_patch(pair):
    assert_ping(pair.a, IP_B)
    assert_ping(pair.b, IP_A)
    # vhu carried it: each port received at least the 20 requests (or replies)
    rx_a, tx_a = rx_tx(pair.vhu, 0)
    rx_b, tx_b = rx_tx(pair.vhu, 1)
    assert rx_a >= 40 and rx_b >= 40 and tx_a >= 40 and tx_b >= 40, pair.vhu.stats()


def test_tcp_4mib_transfer_checksums_equal(pair):
    before = pair.vhu.port(0)["rx_bytes"]
    assert transfer(pair.a, pair.b, IP_B) == FILE_SIZE
    wait_counters(pair.vhu)
    assert pair.vhu.port(0)["rx_bytes"] - before >= FILE_SIZE


def test_guest_powered_off_and_booted_again_on_the_same_socket(pair):
    vhu = pair.vhu
    pid = vhu.proc.pid
    connects = vhu.output().count("port 0: front-end connected")
    pair.a.poweroff()
    pair.a = pair.guest("a").launch()
    pair.a.wait_ready(BOOT_TIMEOUT)
    pair.a.run("echo booted > /tmp/marker", check=True)
    vhu.wait_log("port 0: front-end connected", count=connects + 1)
    assert_ping(pair.a, IP_B)
    assert_ping(pair.b, IP_A)
    # the same vhu.master served both boots; port 1 never saw a reconnect
    assert vhu.proc.poll() is None and vhu.proc.pid == pid
    assert vhu.output().count("port 1: front-end connected") == 1
    assert "died" not in vhu.output() and "port 1: disconnected" not in vhu.output()


def test_vhu_sigkilled_and_restarted_as_server_qemu_reconnects(pair):
    """vhu listens; QEMU's chardev has reconnect=1."""
    restart_vhu_under_running_guests(pair)


def ride_out_worker_kills(p, kills=10, every=1.5):
    """Both guests ping each other 5 times a second while their worker is
    SIGKILLed `kills` times: each time it is replaced and the rings resume
    where they stood; the guests keep their link and at least 90% of the
    pings return."""
    count = int(kills * every / 0.2) + 25
    for g, ip in ((p.a, IP_B), (p.b, IP_A)):
        g.run(f"ping -c {count} -i 0.2 {ip} > /tmp/ping.log 2>&1 &", check=True)
    time.sleep(2)
    for k in range(kills):
        pid = p.vhu.stats()["workers"][0]["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while p.vhu.stats()["workers"][0]["pid"] == pid:
            assert time.monotonic() < deadline, f"kill {k}: worker not replaced"
            time.sleep(0.05)
        time.sleep(every)
    for g in (p.a, p.b):
        out, _ = g.run("while pidof ping >/dev/null; do sleep 0.5; done; cat /tmp/ping.log",
                       timeout=count * 0.2 + 60)
        m = re.search(r"(\d+) packets transmitted, (\d+) packets received", out)
        assert m, out
        sent, got = int(m.group(1)), int(m.group(2))
        assert sent == count and got >= 0.9 * sent, f"{got} of {sent} pings returned:\n{out[-800:]}"
        state, _ = g.run("cat /sys/class/net/eth0/operstate /sys/class/net/eth0/carrier")
        assert state.split() == ["up", "1"], state
        print(f"{got} of {sent} pings returned across {kills} worker kills")
    assert sum(w["replaced"] for w in p.vhu.stats()["workers"]) >= kills
    assert_ping(p.a, IP_B)


def test_guests_ride_out_worker_kills(pair):
    ride_out_worker_kills(pair)


def test_guests_ride_out_worker_kills_packed():
    p = Pair(packed=True).start()
    try:
        ride_out_worker_kills(p)
    finally:
        p.close()


def test_client_mode_ping_and_transfer(client_pair):
    assert_ping(client_pair.a, IP_B)
    assert transfer(client_pair.b, client_pair.a, IP_A) == FILE_SIZE


def test_vhu_sigkilled_and_restarted_in_client_mode(client_pair):
    """vhu --client; QEMU listens (server=on,wait=off)."""
    restart_vhu_under_running_guests(client_pair)


def test_two_queue_pairs(tmp_path):
    """--queues 2 and -netdev ...,queues=2 + mq=on. The guest has 2 vCPUs, so
    its virtio-net driver enables both queue pairs (one per CPU); pings pinned
    to each vCPU transmit on their CPU's queue (XPS). vhu's per-queue counters
    show that both queue pairs of both ports carried frames."""
    p = Pair(queues=2, smp=2)
    try:
        p.start()
        for g in (p.a, p.b):
            out, _ = g.run("ls /sys/class/net/eth0/queues/")
            assert out.split() == ["rx-0", "rx-1", "tx-0", "tx-1"], out
        for g, dst in ((p.a, IP_B), (p.b, IP_A)):
            for cpu in (0, 1):
                out, rc = g.run(f"taskset -c {cpu} ping -c 5 -i 0.2 {dst}", timeout=30)
                assert rc == 0 and ", 0% packet loss" in out, out
        assert transfer(p.a, p.b, IP_B) == FILE_SIZE
        wait_counters(p.vhu)
        for port in (0, 1):
            qs = p.vhu.port(port)["queues"]
            assert [q["queue"] for q in qs] == [0, 1]
            # frames from this guest's TX queues into vhu, per queue pair
            assert all(q["rx_packets"] > 0 for q in qs), (port, qs)
        # (drops are allowed: a guest slower than its peer fills its RX ring, as
        # on a real cable; TCP resends and the checksums above stay equal)
        assert not p.vhu.port(0)["broken"] and not p.vhu.port(1)["broken"]
    finally:
        p.close()


# --------------------------------------------------------------------------- helpers


def wait_counters(vhu):
    vhu.wait_stable("rx_packets", port=0, settle=0.5)
    vhu.wait_stable("rx_packets", port=1, settle=0.5)


def worker_pids(master_pid):
    """vhu.master's workers (its descendants), from /proc."""
    return descendants(master_pid)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def assert_gone(pids, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    left = [p for p in pids if _alive(p)]
    assert not left, f"vhu worker processes left behind: {left}"


def uptime(g):
    out, rc = g.run("cat /proc/uptime")
    assert rc == 0, out
    return float(out.split()[-2])


def restart_vhu_under_running_guests(p):
    """SIGKILL vhu.master (its workers exit on control-socket EOF), start a new
    one on the same socket paths: the guests keep running and traffic resumes."""
    assert_ping(p.a, IP_B, count=3)
    up = {g: uptime(g) for g in (p.a, p.b)}
    old = p.vhu
    workers = worker_pids(old.proc.pid)
    assert workers, "vhu.master has worker processes"
    old.proc.send_signal(signal.SIGKILL)
    old.proc.wait(10)
    old.log.close()
    assert_gone(workers)
    if not p.client:
        assert os.path.exists(old.sockets[0]), "a SIGKILLed vhu leaves its socket file"
    p.start_vhu()                    # same paths; replaces the stale socket file
    if not p.client:
        for path in old.sockets:
            p.vhu.wait_log(f"{path}: removed a stale socket file")
    took = wait_ping(p.a, IP_B, timeout=60)
    assert_ping(p.a, IP_B)
    assert_ping(p.b, IP_A)
    assert transfer(p.a, p.b, IP_B, port=5002, size=1 << 20) == 1 << 20
    for g in (p.a, p.b):             # no reboot: same boot, marker still there, link up
        assert g.alive()
        assert uptime(g) > up[g]
        out, _ = g.run("cat /tmp/marker /sys/class/net/eth0/operstate")
        assert out.split() == ["booted", "up"], out
    wait_counters(p.vhu)
    for port in (0, 1):              # the new vhu carried it
        st = p.vhu.port(port)
        assert st["connected"] and st["rx_packets"] >= 40 and st["tx_packets"] >= 40, st
        assert not st["broken"], st
    print(f"traffic resumed {took:.1f}s after vhu.master restarted")
