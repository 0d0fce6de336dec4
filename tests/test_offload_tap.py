"""A QEMU guest with offloads through a TAP (IFF_VNET_HDR) to the host's
kernel stack in a network namespace the test makes: TCP both ways, 16 MiB,
md5 equal on both ends; the kernel handed vhu large frames and took large
frames from it (the stats' offload counters), and nothing was refused.

Needs root (TAP, netns), iproute2, busybox and the QEMU guest peers."""
import hashlib
import os
import shutil
import subprocess
import tempfile
import time

import pytest

from tests.vhuproc import VhuMaster
from vhu.testbed.guest import Guest, find_busybox

pytestmark = pytest.mark.peers("qemu", "tap")
HOST_IP, GUEST_IP = "10.0.15.1", "10.0.15.2"
SIZE = 16 << 20


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def tap_guest():
    tap, ns = f"i15t{os.getpid() % 100000}", f"issue15-ns-{os.getpid()}"
    d = tempfile.mkdtemp(prefix="vhu-i15-")
    vhu = VhuMaster(_Dir(d), "--app", "patch", "--tap", tap, "--cpus", "0", sockets=("g.sock",))
    guest, served = None, False
    try:
        vhu.wait_sockets()
        vhu.wait_started()
        vhu.wait_log(f"TAP {tap}")
        ip("netns", "add", ns)
        ip("link", "set", tap, "netns", ns)
        ip("-n", ns, "addr", "add", f"{HOST_IP}/24", "dev", tap)
        ip("-n", ns, "link", "set", tap, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        guest = Guest(os.path.join(d, "g.sock"), ip=f"{GUEST_IP}/24", mac="52:54:00:00:15:02",
                      cpu=1, name=f"vhu-i15-{os.getpid()}", log_path=os.path.join(d, "g.console"))
        guest.launch()
        guest.wait_ready(120)
        yield vhu, guest, ns, d
        served = True
    finally:
        if guest is not None:
            guest.close()
        vhu.stop(check=served)      # the balance check, unless set-up failed
        ip("netns", "del", ns, check=False)
        shutil.rmtree(d, ignore_errors=True)


class _Dir:
    def __init__(self, path):
        self.path = path

    def __truediv__(self, name):
        return os.path.join(self.path, name)


def in_ns(ns, *argv, **kw):
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)


def test_tcp_both_ways_through_a_tap_with_offloads(tap_guest):
    vhu, guest, ns, d = tap_guest
    bb = find_busybox()
    assert vhu.port(1)["offloads"] and "HOST_TSO4" in vhu.port(1)["offloads"]
    res = guest.ping(HOST_IP, count=3, interval=0.2, deadline=30)
    assert res["received"] == 3, res["output"]
    # guest -> host
    got = os.path.join(d, "from-guest")
    guest.run(f"dd if=/dev/urandom of=/tmp/tx bs=65536 count={SIZE // 65536} 2>/dev/null",
              check=True, timeout=60)
    _, sent_md5 = guest.size_and_md5("/tmp/tx")
    with open(got, "wb") as out:
        listener = in_ns(ns, bb, "nc", "-l", "-p", "5101", stdin=subprocess.PIPE, stdout=out)
        try:
            time.sleep(0.5)             # busybox nc -l has no readiness signal on the host
            out_, rc = guest.run(f"nc {HOST_IP} 5101 < /tmp/tx", timeout=180)
            assert rc == 0, out_
            listener.wait(timeout=60)
        finally:
            listener.kill()
            listener.wait()
    with open(got, "rb") as f:
        data = f.read()
    assert len(data) == SIZE and hashlib.md5(data).hexdigest() == sent_md5
    # host -> guest
    payload = os.urandom(SIZE)
    src = os.path.join(d, "to-guest")
    with open(src, "wb") as f:
        f.write(payload)
    guest.run("rm -f /tmp/rx; sleep 600 | nc -l -p 5102 > /tmp/rx &", check=True)
    guest.run("i=0; while ! grep -q ':13EE 00000000:0000 0A' /proc/net/tcp && [ $i -lt 50 ]; "
              "do sleep 0.1; i=$((i+1)); done", check=True)
    with open(src, "rb") as f:
        sender = in_ns(ns, bb, "nc", GUEST_IP, "5102", stdin=f)
        try:
            sender.wait(timeout=180)
        finally:
            sender.kill()
            sender.wait()
    guest.run("i=0; while pidof nc >/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; "
              "killall sleep; wait", timeout=60)
    size, md5 = guest.size_and_md5("/tmp/rx")
    assert size == SIZE and md5 == hashlib.md5(payload).hexdigest()
    g, t = vhu.port(0), vhu.port(1)
    print("guest port offload", g["offload"], "tap port offload", t["offload"])
    # The guest's large frames went into the TAP as they are, and the
    # kernel's large frames came out of it (into the guest as they are).
    assert g["offload"]["tx_gso"] > 0 and t["offload"]["rx_gso"] > 0, (g, t)
    assert t["offload"]["tx_gso"] > 0 and g["offload"]["rx_gso"] > 0, (g, t)
    assert g["drops_by_reason"]["bad_offload"] == 0 and t["drops_by_reason"]["bad_offload"] == 0
