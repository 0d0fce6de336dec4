"""VXLAN ports against real peers: the Linux kernel's vxlan, a second vhu,
and a hostile sender, every VTEP in a network namespace of its own.

    v16t..  (overlay host: vhu's TAP, 10.16.1.1/24, MTU 1450)
      |  TAP
    v16a..  vhu --app switch: socket, TAP, --vxlan vni=42,local=10.16.0.1,
      |     remote=10.16.0.2,remote=10.16.2.2
      |-- veth 10.16.0.1 <-> 10.16.0.2 -- v16b..  kernel vx0 (vni 42), 10.16.1.2/24
      `-- veth 10.16.2.1 <-> 10.16.2.2 -- v16c..  kernel vx0 (vni 42), 10.16.1.3/24

The TAP host stands in for a guest where a QEMU guest is not the point
(ping, TCP md5 both ways, flooding and learning, hostile datagrams); the
QEMU tests put a guest on the socket (host_mtu=1450) and talk to the
kernel's vxlan, and to a guest behind a second vhu. Nothing leaves the
namespaces; they are deleted afterwards, also on failure. Needs root and
iproute2 (peers "tap"); the guest tests QEMU too.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from tests.vhuproc import VhuMaster, wait_until
from vhu import vxlan
from vhu.testbed.netns import RECEIVER, SENDER, Netns, kernel_vxlan, veth

pytestmark = pytest.mark.peers("tap")
VNI = 42
A_IP, B_IP, A2_IP, C_IP, FOREIGN_IP = "10.16.0.1", "10.16.0.2", "10.16.2.1", "10.16.2.2", "10.16.0.9"
T_OV, B_OV, C_OV = "10.16.1.1", "10.16.1.2", "10.16.1.3"
B_MAC, C_MAC = "02:16:00:00:00:02", "02:16:00:00:00:03"
FILE_SIZE = 4 << 20
HOSTILE_TYPE = 0x88B5               # IEEE local experimental EtherType: only the test sends it


class _Dir:
    def __init__(self):
        self.path = tempfile.mkdtemp(prefix="v16-")

    def __truediv__(self, name):
        return os.path.join(self.path, name)


def busybox_ping(ns, dst, count, interval=0.2, deadline=60, size=None):
    ping = ["ping"] if shutil.which("ping") else [shutil.which("busybox") or "busybox", "ping"]
    opts = ["-s", size] if size else []
    out = ns.run(*ping, "-c", count, "-i", interval, "-w", deadline, *opts, dst, check=False,
                 timeout=deadline + 30)
    m = re.search(r"(\d+) (packets )?received", out.stdout)
    return int(m.group(1)) if m else 0, out.stdout + out.stderr


def tcp_transfer(src_ns, dst_ns, dst_ip, port, size=FILE_SIZE, timeout=120):
    """size random bytes src -> dst over TCP: (sent, received) as (bytes, md5)."""
    rx = dst_ns.popen(sys.executable, "-c", RECEIVER, dst_ip, port, timeout,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert rx.stdout.readline().strip() == "listening", rx.stderr.read()
        tx = src_ns.python(SENDER, dst_ip, str(port), str(size), str(timeout), check=False,
                           timeout=timeout + 30)
        assert tx.returncode == 0, tx.stderr
        out, err = rx.communicate(timeout=timeout)
        assert rx.returncode == 0, err
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    sent = tx.stdout.split()
    got = out.split()
    return (int(sent[0]), sent[1]), (int(got[0]), got[1])


def ctl(control, *args):
    out = subprocess.run([sys.executable, "-m", "vhu.ctl", "--control", control, "--json", *args],
                         capture_output=True, text=True, timeout=60)
    reply = json.loads(out.stdout)
    assert reply["ok"], reply
    return reply["result"]


class Lab:
    """The namespaces above, the kernel VTEPs, and vhu in v16a."""

    def __init__(self, workers=1, name="v16"):
        self.workers = workers
        self.name = name            # prefix of the namespaces and devices
        self.d = _Dir()
        self.ns = []
        self.vhu = None
        try:
            self._build()
        except BaseException:
            self.close(check=False)
            raise

    def _build(self):
        tag, n = os.getpid() % 10000, self.name
        self.a = self._ns(f"{n}a{tag}")
        self.b = self._ns(f"{n}b{tag}")
        self.c = self._ns(f"{n}c{tag}")
        self.t = self._ns(f"{n}t{tag}")
        veth(self.a, "v16a0", self.b, "v16b0", A_IP, B_IP)
        veth(self.a, "v16a1", self.c, "v16c0", A2_IP, C_IP)
        self.a.sysctl("net.ipv4.conf.all.rp_filter", 0)
        self.c.ip("route", "add", "10.16.0.0/24", "via", A2_IP)
        kernel_vxlan(self.b, "vx0", VNI, B_IP, [A_IP], "v16b0", B_OV, mac=B_MAC)
        kernel_vxlan(self.c, "vx0", VNI, C_IP, [A_IP], "v16c0", C_OV, mac=C_MAC)
        self.tap = f"{n}tap{tag}"
        self.spec = f"vni={VNI},local={A_IP},remote={B_IP},remote={C_IP}"
        self.control = self.d / "vhu.ctl"
        self.vhu = VhuMaster(self.d, "--app", "switch", "--tap", self.tap, "--vxlan", self.spec,
                             "--control", self.control, "--cpus", "0", "--metrics-port", "0", "--workers", str(self.workers),
                             sockets=("g.sock",), netns=self.a.name)
        self.vhu.wait_sockets()
        self.vhu.wait_started()
        self.vhu.wait_log(f"TAP {self.tap}")
        self.vhu.wait_log(f"VXLAN vni {VNI}")
        self.a.ip("link", "set", self.tap, "netns", self.t.name)
        self.t.ip("link", "set", self.tap, "mtu", 1450)
        self.t.ip("addr", "add", f"{T_OV}/24", "dev", self.tap)
        self.t.ip("link", "set", self.tap, "up")

    def _ns(self, name):
        ns = Netns(name)
        self.ns.append(ns)
        return ns

    def port(self, kind):
        for p in self.vhu.stats()["ports"]:
            if p["socket"].startswith(kind):
                return p
        raise KeyError(kind)

    def remote(self, addr):
        for r in self.port("vxlan:")["vxlan"]["remotes"]:
            if r["remote"] == addr:
                return r
        raise KeyError(addr)

    def close(self, check=True):
        """check: the balance check and exit status 0 (not after a failure)."""
        try:
            if self.vhu is not None:
                self.vhu.stop(check=check)
        finally:
            for ns in self.ns:
                ns.delete()
            shutil.rmtree(self.d.path, ignore_errors=True)


@pytest.fixture(scope="module")
def lab():
    made, served = Lab(), False
    try:
        yield made
        served = True
    finally:
        made.close(check=served)


def ping_and_tcp_both_ways(lab):
    """The TAP host and kernel VTEP B: 20 pings and 4 MiB of TCP each way;
    the VXLAN port's document once its counters show the transfers."""
    got, out = busybox_ping(lab.t, B_OV, 20)
    assert got == 20, out
    got, out = busybox_ping(lab.b, T_OV, 20)
    assert got == 20, out
    sent, received = tcp_transfer(lab.t, lab.b, B_OV, 5001)
    assert sent == received and sent[0] == FILE_SIZE
    sent, received = tcp_transfer(lab.b, lab.t, T_OV, 5002)
    assert sent == received and sent[0] == FILE_SIZE
    # 4 MiB each way at most 1410 bytes of TCP payload a frame: thousands
    # each way (the stats file is rewritten every 0.2 s).
    return wait_until(lambda: (lambda v: v["rx_packets"] > FILE_SIZE // 1450 and
                             v["tx_packets"] > FILE_SIZE // 1450 and v["rx_bytes"] > FILE_SIZE and
                             v["tx_bytes"] > FILE_SIZE and v)(lab.port("vxlan:")),
                    10, "the VXLAN port's counters")


def test_tap_host_and_kernel_vxlan_ping_and_tcp_both_ways(lab):
    v = ping_and_tcp_both_ways(lab)
    assert v["socket"] == f"vxlan:{VNI}@{A_IP}:4789" and v["connected"]
    wait_until(lambda: (lambda r: r["rx_packets"] > FILE_SIZE // 1450 and
                          r["tx_packets"] > FILE_SIZE // 1450 and r["macs"] >= 1 and r)(
                              lab.remote(B_IP)), 10, "the remote's counters")
    assert v["drops_by_reason"]["vxlan_bad"] == 0 and v["drops_by_reason"]["vxlan_foreign"] == 0
    # The send sockets' source ports are the kernel vxlan's range.
    lo, hi = map(int, lab.a.run("cat", "/proc/sys/net/ipv4/ip_local_port_range").stdout.split())
    show = ctl(lab.control, "show")
    vx = [p for p in show["ports"] if p["kind"] == "vxlan"][0]["vxlan"]
    assert vx["underlay_mtu"] == 1500 and vx["max_inner_frame"] == 1464
    assert len(vx["source_ports"]) == vxlan.SEND_SOCKETS
    assert all(lo <= sp <= hi for sp in vx["source_ports"]), vx


def test_tap_and_vxlan_on_two_workers_ping_and_tcp_both_ways():
    """--workers 2: the TAP and the VXLAN port are polled by different
    workers, so every frame between the overlay host and the kernel VTEP
    crosses workers (the TAP's frames are sent on the VXLAN port's sockets
    by the TAP's worker; the decapsulated ones go into the TAP from the
    VXLAN port's)."""
    two, served = Lab(workers=2, name="v19"), False
    try:
        show = ctl(two.control, "show")
        polled = {p["kind"]: p["queue_pairs"][0]["worker"] for p in show["ports"]
                  if p["kind"] in ("tap", "vxlan")}
        assert sorted(polled.values()) == [0, 1], show["ports"]
        v = ping_and_tcp_both_ways(two)
        assert all(v["drops_by_reason"][r] == 0 for r in ("vxlan_bad", "vxlan_foreign",
                                                          "vxlan_too_big")), v["drops_by_reason"]
        # A second VNI on the same UDP socket is read by the same worker (one
        # reader per socket), wherever round-robin would have put it.
        added = ctl(two.control, "add-port", "--vxlan", f"vni=43,local={A_IP},remote={C_IP}")
        assert added["queue_pairs"][0]["worker"] == polled["vxlan"], added
        ctl(two.control, "del-port", added["socket"])
        got, out = busybox_ping(two.t, B_OV, 3)
        assert got == 3, out
        served = True
    finally:
        two.close(check=served)


CAPTURE = r"""
import socket, struct, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
s.bind((sys.argv[1], 0x0800))
s.settimeout(1.0)
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    try:
        ip = s.recv(65536)
    except socket.timeout:
        continue
    ihl = (ip[0] & 15) * 4
    if ip[9] != 17 or socket.inet_ntoa(ip[12:16]) != sys.argv[2]:
        continue
    sport, dport, ulen, csum = struct.unpack_from("!HHHH", ip, ihl)
    if dport == 4789:
        df = bool(struct.unpack_from("!H", ip, 6)[0] & 0x4000)
        print(sport, csum, int(df), ip[ihl + 8:ihl + 16].hex(), ip[ihl + 16:ihl + 22].hex(),
              flush=True)
        break
"""


def test_datagrams_on_the_wire(lab):
    """What vhu sends, as the underlay sees it: UDP to 4789 from one of its
    send sockets' ports, checksum zero, DF set (never fragmented), the VXLAN
    header with the I flag and VNI 42, the inner frame behind it."""
    cap = lab.b.popen(sys.executable, "-c", CAPTURE, "v16b0", A_IP, 30, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    try:
        assert cap.stdout.readline().strip() == "ready", cap.stderr.read()
        got, out = busybox_ping(lab.t, B_OV, 1)
        assert got == 1, out
        out, err = cap.communicate(timeout=60)
    finally:
        if cap.poll() is None:
            cap.kill()
            cap.wait()
    sport, csum, df, hdr, inner_dst = out.split()
    vx = [p for p in ctl(lab.control, "show")["ports"] if p["kind"] == "vxlan"][0]["vxlan"]
    assert int(sport) in vx["source_ports"], (sport, vx)
    assert int(csum) == 0 and df == "1"
    assert hdr == vxlan.header(VNI).hex() == "08000000" + "00002a00"
    assert inner_dst in ("ffffffffffff", B_MAC.replace(":", ""))


METRICS = r"""
import re, sys, urllib.request
print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode())
"""


def test_prometheus_has_the_remotes(lab):
    port = int(re.search(r"metrics: http://127\.0\.0\.1:(\d+)/metrics", lab.vhu.output()).group(1))
    busybox_ping(lab.t, B_OV, 2)
    text = lab.a.python(METRICS, str(port)).stdout
    sent = re.search(r'^vhu_vxlan_remote_tx_packets_total\{port="2",remote="%s",'
                     r'socket="vxlan:42@10.16.0.1:4789"\} (\S+)$' % re.escape(B_IP), text, re.M)
    assert sent and float(sent.group(1)) > 0, text[-3000:]
    assert re.search(r'^vhu_vxlan_remote_macs\{port="2",remote="%s",[^}]*\} [1-9]' %
                     re.escape(B_IP), text, re.M), text[-3000:]
    assert re.search(r'^vhu_drops_total\{port="2",queue="0",reason="vxlan_bad",'
                     r'socket="vxlan:42@10.16.0.1:4789"\} ', text, re.M), text[-3000:]


def fresh_stats(lab):
    """Wait for a stats file written after now: it counts every frame
    vhu handled before (the workers count in shared memory as they go)."""
    now = time.time()
    wait_until(lambda: lab.vhu.stats()["time"] > now + 0.05, 30, "a fresh stats file")


def test_three_hosts_flood_then_learn(lab):
    # Both kernel VTEPs answer (the ARP requests were flooded to both remotes).
    for dst in (B_OV, C_OV):
        got, out = busybox_ping(lab.t, dst, 3)
        assert got == 3, out
    fresh_stats(lab)
    c_before = lab.remote(C_IP)["tx_packets"]
    c_kernel_before = lab.c.counter("vx0", "rx_packets")
    b_before = lab.remote(B_IP)["tx_packets"]
    got, out = busybox_ping(lab.t, B_OV, 50, interval=0.05)
    assert got == 50, out
    fresh_stats(lab)
    # 50 echo requests to a learned MAC went to B only: nothing at C.
    assert lab.remote(B_IP)["tx_packets"] - b_before >= 50
    assert lab.remote(C_IP)["tx_packets"] == c_before
    assert lab.c.counter("vx0", "rx_packets") == c_kernel_before
    assert lab.remote(B_IP)["macs"] >= 1 and lab.remote(C_IP)["macs"] >= 1
    table = {r["mac"]: r for r in ctl(lab.control, "mac-table")}
    vx_index = lab.port("vxlan:")["port"]
    assert table[B_MAC]["port"] == vx_index and table[B_MAC]["remote"] == B_IP
    assert table[C_MAC]["port"] == vx_index and table[C_MAC]["remote"] == C_IP


HOSTILE = r"""
import socket, struct, sys
vni, dst, foreign = int(sys.argv[1]), sys.argv[2], sys.argv[3]
hdr = lambda w0, w1: struct.pack("!II", w0, w1)
good = hdr(0x08000000, vni << 8)
frame = b"\xff" * 6 + bytes.fromhex("021600000099") + bytes.fromhex("88b5") + b"hostile" * 8
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
bad = ([hdr(0, vni << 8) + frame] * 3 +                    # I flag missing
       [hdr(0x0C000000, vni << 8) + frame] * 3 +           # a reserved flag set
       [hdr(0x08000000, (vni << 8) | 7) + frame] * 3 +     # reserved byte set
       [hdr(0x08000000, (vni + 1) << 8) + frame] * 3 +     # another VNI
       [good[:5]] * 3 + [good] * 3 + [good + frame[:13]] * 3 +   # truncated
       [good + frame + bytes(65000 - len(frame))] * 3 +    # 64 KiB (fragmented, reassembled)
       [good + frame + bytes(1500)] * 3)                   # over the underlay MTU
for d in bad:
    s.sendto(d, (dst, 4789))
f = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
f.bind((foreign, 0))
for _ in range(5):
    f.sendto(good + frame, (dst, 4789))                    # a source not in the remote list
print(len(bad), 5, flush=True)
"""

LISTEN = r"""
import select, socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
s.bind((sys.argv[1], 0x88B5))
print("ready", flush=True)
n, end = 0, time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    if select.select([s], [], [], 0.1)[0]:
        data = s.recv(65536)
        n += 1
        if b"control" in data:
            break
print(n, flush=True)
"""


def test_hostile_datagrams_are_counted_and_never_delivered(lab):
    lab.b.ip("addr", "add", f"{FOREIGN_IP}/24", "dev", "v16b0")
    before = lab.port("vxlan:")["drops_by_reason"]
    listen = lab.t.popen(sys.executable, "-c", LISTEN, lab.tap, 60, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert listen.stdout.readline().strip() == "ready", listen.stderr.read()
        out = lab.b.python(HOSTILE, str(VNI), A_IP, FOREIGN_IP)
        nbad, nforeign = map(int, out.stdout.split())

        def counted():
            d = lab.port("vxlan:")["drops_by_reason"]
            return (d["vxlan_bad"] - before["vxlan_bad"] >= nbad and
                    d["vxlan_foreign"] - before["vxlan_foreign"] >= nforeign) and d
        d = wait_until(counted, 30, "the hostile datagrams counted")
        assert d["vxlan_bad"] - before["vxlan_bad"] == nbad
        assert d["vxlan_foreign"] - before["vxlan_foreign"] == nforeign
        assert lab.remote(B_IP)["rx_bad"] >= nbad
        # A good datagram with the same EtherType: the listener sees it, and
        # saw nothing before it (the control frame shows the path works).
        good = (vxlan.header(VNI) + b"\xff" * 6 + bytes.fromhex("021600000099") +
                bytes.fromhex("88b5") + b"control" * 8)
        lab.b.python("import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                     "s.bind((sys.argv[2], 0)); s.sendto(bytes.fromhex(sys.argv[1]), "
                     "(sys.argv[3], 4789))", good.hex(), B_IP, A_IP)
        out, err = listen.communicate(timeout=90)
        assert out.split() == ["1"], f"frames of the test's EtherType at the TAP host: {out} {err}"
    finally:
        if listen.poll() is None:
            listen.kill()
            listen.wait()
        lab.b.ip("addr", "del", f"{FOREIGN_IP}/24", "dev", "v16b0", check=False)
    # The switch goes on.
    got, out = busybox_ping(lab.t, B_OV, 5)
    assert got == 5, out


def test_an_inner_frame_over_the_underlay_mtu_is_dropped_and_counted(lab):
    """With its MTU raised to 1500 the TAP host sends 1514-byte frames: over
    the 1464 a 1500-byte underlay carries, so dropped and counted, never
    fragmented; a frame of 1464 bytes still passes."""
    busybox_ping(lab.t, B_OV, 1)                       # ARP resolved
    fresh_stats(lab)
    before = lab.port("vxlan:")["drops_by_reason"]["vxlan_too_big"]
    lab.t.ip("link", "set", lab.tap, "mtu", 1500)
    try:
        got, out = busybox_ping(lab.t, B_OV, 3, deadline=5, size=1500 - 28)
        assert got == 0, out
        wait_until(lambda: lab.port("vxlan:")["drops_by_reason"]["vxlan_too_big"] >= before + 3,
                 10, "vxlan_too_big counted")
        got, out = busybox_ping(lab.t, B_OV, 3, size=1450 - 28)
        assert got == 3, out
    finally:
        lab.t.ip("link", "set", lab.tap, "mtu", 1450)
    assert lab.port("vxlan:")["drops_by_reason"]["vxlan_too_big"] == before + 3


def test_runtime_add_and_del_vxlan_port(lab):
    spec = f"vni=77,local={A_IP},remote={B_IP},port=4790"
    added = ctl(lab.control, "add-port", "--vxlan", spec)
    assert added["kind"] == "vxlan" and added["socket"] == f"vxlan:77@{A_IP}:4790"
    # The socket is bound in vhu's namespace: a second bind fails there.
    probe = lab.a.python("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                         "try:\n s.bind(('" + A_IP + "', 4790)); print('free')\n"
                         "except OSError: print('bound')")
    assert probe.stdout.strip() == "bound"
    dup = subprocess.run([sys.executable, "-m", "vhu.ctl", "--control", lab.control,
                          "add-port", "--vxlan", spec], capture_output=True, text=True, timeout=60)
    assert dup.returncode == 1 and "already" in dup.stderr
    removed = ctl(lab.control, "del-port", f"vxlan:77@{A_IP}:4790")
    assert removed["port"] == added["port"]
    probe = lab.a.python("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                         "s.bind(('" + A_IP + "', 4790)); print('free')")
    assert probe.stdout.strip() == "free"
    assert all(p["kind"] != "vxlan" or p["socket"] != added["socket"]
               for p in ctl(lab.control, "show")["ports"])
    got, out = busybox_ping(lab.t, B_OV, 3)
    assert got == 3, out
    # What the port took (sockets, the counters' memfd and its mappings, in
    # the master and the worker) is given back.
    lab.vhu.check_balance()



def test_two_vnis_share_one_udp_port(lab):
    """vni 43 added at runtime on vni 42's address and UDP port: one socket,
    read once for both ports; each datagram goes to the port of its VNI (a
    kernel vxlan with id 43 in v16c answers through it); once vni 43 is
    removed its datagrams are vxlan_bad on the port left, whose own traffic
    never paused."""
    lab.c.sysctl("net.ipv4.conf.all.arp_ignore", 1)     # vx0 must not answer for vx43's address
    kernel_vxlan(lab.c, "vx43", 43, C_IP, [A_IP], "v16c0", "10.16.43.3")
    lab.t.ip("addr", "add", "10.16.43.1/24", "dev", lab.tap)
    added = None
    try:
        added = ctl(lab.control, "add-port", "--vxlan", f"vni=43,local={A_IP},remote={C_IP}")
        assert added["socket"] == f"vxlan:43@{A_IP}:4789"
        bad42 = lab.port("vxlan:42")["drops_by_reason"]["vxlan_bad"]
        got, out = busybox_ping(lab.t, "10.16.43.3", 5)
        assert got == 5, out
        got, out = busybox_ping(lab.t, B_OV, 3)
        assert got == 3, out
        p43 = wait_until(lambda: (lambda p: p["rx_packets"] >= 5 and p)(lab.port("vxlan:43")), 10,
                       "vni 43's counters")
        assert p43["vxlan"]["remotes"][0]["rx_packets"] >= 5
        assert p43["drops_by_reason"]["vxlan_bad"] == 0
        assert lab.port("vxlan:42")["drops_by_reason"]["vxlan_bad"] == bad42
        assert lab.c.counter("vx43", "rx_packets") >= 5
        ctl(lab.control, "del-port", added["socket"])
        added = None
        got, out = busybox_ping(lab.t, B_OV, 3)
        assert got == 3, out
        got, out = busybox_ping(lab.t, "10.16.43.3", 2, deadline=4)
        assert got == 0, out
        got, out = busybox_ping(lab.c, "10.16.43.1", 2, deadline=4)     # vx43 -> vhu
        assert got == 0, out
        wait_until(lambda: lab.port("vxlan:42")["drops_by_reason"]["vxlan_bad"] > bad42, 10,
                 "vni 43 datagrams counted bad on the port left")
    finally:
        if added is not None:
            ctl(lab.control, "del-port", added["socket"])
        lab.t.ip("addr", "del", "10.16.43.1/24", "dev", lab.tap, check=False)
        lab.c.ip("link", "del", "vx43", check=False)


FORWARDER = r"""
import json, socket, subprocess, sys, tempfile, time, os
from vhu.workers import Forwarder, TapDevice, VxlanPort
d = tempfile.mkdtemp(prefix="v16fw-")
spec = VxlanPort(vni=42, local=sys.argv[1], remotes=[sys.argv[2]], port=4791)
with Forwarder([os.path.join(d, "x.sock"), TapDevice(sys.argv[3]), spec], pipeline=["switch"],
               stats_interval=0.2) as fw:
    subprocess.run(["ip", "link", "set", sys.argv[3], "up"], check=True)
    kinds = [p["kind"] for p in fw.ports()]
    print("ready", json.dumps(kinds), flush=True)
    sys.stdin.readline()                       # the test sent its datagram
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        st = fw.stats()
        if st[2]["rx_packets"] and st[1]["tx_packets"]:
            break
        time.sleep(0.1)
    print(json.dumps(st), flush=True)
"""


def test_forwarder_with_a_vxlan_port(lab):
    """vhu.workers.Forwarder([..., TapDevice, VxlanPort(...)]) in vhu's
    namespace: a datagram from B is decapsulated and switched to the TAP."""
    fw = lab.a.popen(sys.executable, "-c", FORWARDER, A_IP, B_IP, "v16ftap", stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        line = fw.stdout.readline()
        assert line.startswith("ready"), line + fw.stderr.read()
        assert json.loads(line.split(" ", 1)[1]) == ["vhost-user", "tap", "vxlan"]
        frame = b"\xff" * 6 + bytes.fromhex("021600000077") + bytes.fromhex("88b5") + bytes(50)
        lab.b.python("import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                     "s.bind((sys.argv[2], 0)); s.sendto(bytes.fromhex(sys.argv[1]), "
                     "(sys.argv[3], 4791))", (vxlan.header(42) + frame).hex(), B_IP, A_IP)
        out, err = fw.communicate("sent\n", timeout=120)
        assert fw.returncode == 0, err[-3000:]
        st = json.loads(out)
        assert st[2]["socket"] == f"vxlan:42@{A_IP}:4791"
        assert st[2]["rx_packets"] == 1 and st[2]["rx_bytes"] == len(frame)
        assert st[2]["vxlan"]["remotes"][0]["rx_packets"] == 1
        assert st[1]["tx_packets"] == 1                 # switched (flooded) to the TAP
    finally:
        if fw.poll() is None:
            fw.kill()
            fw.wait()


def test_a_replacement_worker_gets_the_vxlan_sockets(lab):
    """The worker owning the VXLAN port dies: the supervisor replays the
    port (duplicates of the master's sockets and counters) into its
    replacement; traffic goes on, the per-remote counters are kept."""
    pid = ctl(lab.control, "show")["workers"][0]["pid"]
    before = lab.remote(B_IP)["rx_packets"]
    os.kill(pid, 9)
    wait_until(lambda: ctl(lab.control, "show")["workers"][0]["pid"] != pid, 60, "a replacement")
    wait_until(lambda: busybox_ping(lab.t, B_OV, 1, deadline=5)[0] == 1, 60, "a ping through")
    got, out = busybox_ping(lab.t, B_OV, 5)
    assert got == 5, out
    wait_until(lambda: lab.remote(B_IP)["rx_packets"] >= before + 6, 10, "counters kept")


# -- QEMU guests ----------------------------------------------------------------

G_OV, H_OV = "10.16.1.10", "10.16.1.11"
G_MAC, H_MAC = "52:54:00:16:00:10", "52:54:00:16:00:11"
BOOT_TIMEOUT = 180



def guest_sends(g, ns, dst_ip, port):
    """4 MiB from guest g over TCP to a listener in namespace ns: (sent, received)."""
    g.run(f"dd if=/dev/urandom of=/tmp/tx bs=65536 count={FILE_SIZE // 65536} 2>/dev/null",
          check=True, timeout=60)
    sent = g.size_and_md5("/tmp/tx")
    rx = ns.popen(sys.executable, "-c", RECEIVER, dst_ip, port, 300, stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE, text=True)
    try:
        assert rx.stdout.readline().strip() == "listening", rx.stderr.read()
        out, rc = g.run(f"nc {dst_ip} {port} < /tmp/tx", timeout=300)
        assert rc == 0, out
        got, err = rx.communicate(timeout=300)
        assert rx.returncode == 0, err
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    n, md5 = got.split()
    return sent, (int(n), md5)


def guest_listen(g, port):
    g.run(f"rm -f /tmp/rx; sleep 600 | nc -l -p {port} > /tmp/rx &", check=True)
    g.run(f"i=0; while ! grep -q ':{port:04X} 00000000:0000 0A' /proc/net/tcp && [ $i -lt 50 ]; "
          "do sleep 0.1; i=$((i+1)); done", check=True)


def guest_received(g):
    g.run("i=0; while pidof nc >/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; "
          "killall sleep; wait", timeout=120)
    return g.size_and_md5("/tmp/rx")


@pytest.fixture(scope="module")
def guest(lab):
    """A QEMU guest on the lab vhu's socket, its MTU from host_mtu=1450."""
    from vhu.testbed.guest import Guest
    g = Guest(lab.d / "g.sock", ip=f"{G_OV}/24", mac=G_MAC, cpu=1,
              device_opts={"host_mtu": "1450"}, name=f"v16-g-{os.getpid()}",
              log_path=lab.d / "g.console").launch()
    try:
        g.wait_ready(BOOT_TIMEOUT)
        yield g
    finally:
        g.close()


@pytest.mark.peers("qemu", "tap")
def test_guest_and_kernel_vxlan_ping_and_tcp_both_ways(lab, guest):
    out, _ = guest.run("cat /sys/class/net/eth0/mtu")
    assert out.split()[-1] == "1450", out          # VIRTIO_NET_F_MTU from host_mtu=1450
    res = guest.ping(B_OV, count=20, interval=0.2, deadline=60)
    assert res["received"] == 20, res["output"]
    sent, got = guest_sends(guest, lab.b, B_OV, 5011)
    assert sent == got == (FILE_SIZE, sent[1])
    guest_listen(guest, 5012)
    tx = lab.b.python(SENDER, G_OV, "5012", str(FILE_SIZE), "300", check=False, timeout=330)
    assert tx.returncode == 0, tx.stderr
    n, md5 = tx.stdout.split()
    assert guest_received(guest) == (int(n), md5) == (FILE_SIZE, md5)
    g, vx = lab.vhu.port(0), lab.vhu.port(2)
    assert g["connected"] and g["rx_bytes"] >= FILE_SIZE
    # Every datagram carries at most a 1450-byte inner frame: the guest's TSO
    # frames (it negotiated HOST_TSO4 from vhu) were segmented before
    # encapsulation, as the VXLAN port takes no offloads.
    assert vx["tx_packets"] > FILE_SIZE // 1450
    if g["offload"]["tx_gso"]:
        assert vx["offload"]["rx_segmented"] > 0, (g["offload"], vx["offload"])


@pytest.mark.peers("qemu", "tap")
def test_two_vhu_hosts_joined_only_by_vxlan(lab, guest):
    """A second vhu in namespace b (its own guest) and the lab's vhu, joined
    by a VXLAN port pair on UDP port 4790 (added at runtime on the lab's)."""
    from vhu.testbed.guest import Guest
    d2 = _Dir()
    vhu2 = VhuMaster(d2, "--app", "switch", "--vxlan",
                     f"vni={VNI},local={B_IP},remote={A_IP},port=4790", "--cpus", "0",
                     sockets=("h.sock",), netns=lab.b.name)
    h = added = None
    served = False
    try:
        vhu2.wait_sockets()
        vhu2.wait_started()
        added = ctl(lab.control, "add-port", "--vxlan",
                    f"vni={VNI},local={A_IP},remote={B_IP},port=4790")
        h = Guest(d2 / "h.sock", ip=f"{H_OV}/24", mac=H_MAC, cpu=1,
                  device_opts={"host_mtu": "1450"}, name=f"v16-h-{os.getpid()}",
                  log_path=d2 / "h.console").launch()
        h.wait_ready(BOOT_TIMEOUT)
        res = guest.ping(H_OV, count=10, interval=0.2, deadline=60)
        assert res["received"] == 10, res["output"]
        res = h.ping(G_OV, count=10, interval=0.2, deadline=60)
        assert res["received"] == 10, res["output"]
        guest_listen(h, 5021)
        guest.run(f"dd if=/dev/urandom of=/tmp/tx bs=65536 count={FILE_SIZE // 65536} "
                  "2>/dev/null", check=True, timeout=60)
        sent = guest.size_and_md5("/tmp/tx")
        out, rc = guest.run(f"nc {H_OV} 5021 < /tmp/tx", timeout=300)
        assert rc == 0, out
        assert guest_received(h) == sent == (FILE_SIZE, sent[1])
        guest_listen(guest, 5022)
        h.run(f"dd if=/dev/urandom of=/tmp/tx bs=65536 count={FILE_SIZE // 65536} 2>/dev/null",
              check=True, timeout=60)
        sent = h.size_and_md5("/tmp/tx")
        out, rc = h.run(f"nc {G_OV} 5022 < /tmp/tx", timeout=300)
        assert rc == 0, out
        assert guest_received(guest) == sent == (FILE_SIZE, sent[1])
        # The stats file trails the transfer: wait for the datagrams of both
        # 4 MiB (at most 1450 bytes of inner frame each) to be counted.
        deadline = time.monotonic() + 30
        while True:
            p2 = [p for p in vhu2.stats()["ports"] if p["socket"].startswith("vxlan:")][0]
            if (p2["rx_packets"] > FILE_SIZE // 1450 and p2["tx_packets"] > FILE_SIZE // 1450) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert p2["rx_packets"] > FILE_SIZE // 1450 and p2["tx_packets"] > FILE_SIZE // 1450, p2
        assert p2["drops_by_reason"]["vxlan_bad"] == 0
        served = True
    finally:
        if h is not None:
            h.close()
        if added is not None:
            ctl(lab.control, "del-port", added["socket"])
        vhu2.stop(check=served)     # the balance check, unless the test failed already
        shutil.rmtree(d2.path, ignore_errors=True)
