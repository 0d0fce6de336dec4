"""Runtime control: ports added and removed while vhu runs, state asked for
at any time (python -m vhu.ctl over the control socket, and the Forwarder's
add_port / remove_port / ports), with real peers where it matters: DPDK
testpmd traffic that never stops on the port left alone, QEMU guests whose
port comes and goes.
"""
import inspect
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest

from tests.rawfront import RingFrontend
from tests.test_apps_engine import _tap_usable
from tests.vhuproc import REPO, VhuMaster, frontend_process
import vhu.ctl
from vhu.control import ControlError
from vhu.testbed.dpdk import Testpmd, virtio_user_vdev
from vhu.workers.forwarder import Forwarder

Testpmd.__test__ = False
VHU_CPU, PEER_CPU = "0", 1


# Another user's client: vhu.ctl's own ask(), lifted out of the module so
# that it runs as that user with the standard library only, wherever the
# checkout is and whoever may read it.
OTHER_USERS_CLIENT = "\n".join([
    "import json, socket, sys",
    f"TIMEOUT = {vhu.ctl.TIMEOUT!r}",
    inspect.getsource(vhu.ctl.ask),
    "try:",
    "    reply = ask(sys.argv[1], {'cmd': sys.argv[2]})",
    "except (OSError, ValueError) as exc:",
    "    sys.exit(f'vhu.ctl: {sys.argv[1]}: {exc}')",
    "print(json.dumps(reply))",
    "sys.exit(0 if reply.get('ok') else 1)"])


def ctl(control, *args, user=None):
    """python -m vhu.ctl --control CONTROL --json ARGS: (exit status, reply or
    stderr); as another user: the same request from OTHER_USERS_CLIENT."""
    cmd = [sys.executable, "-m", "vhu.ctl", "--control", control, "--json", *map(str, args)]
    cwd = REPO
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
               sys.executable, "-I", "-c", OTHER_USERS_CLIENT, control, *map(str, args)]
        cwd = "/"
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=60)
    try:
        return r.returncode, json.loads(r.stdout)
    except ValueError:
        return r.returncode, r.stderr


def wait_for(cond, timeout=20.0):
    t = time.monotonic() + timeout
    while time.monotonic() < t:
        if cond():
            return True
        time.sleep(0.05)
    return False


# -- the Forwarder's methods, no peers -----------------------------------------------


def test_forwarder_adds_and_removes_ports(tmp_path):
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    with Forwarder([a], pipeline=["echo"], metrics_port=0) as fw:
        assert [p["socket"] for p in fw.ports()] == [a]
        info = fw.add_port(b, queues=2)
        assert info["port"] == 1 and info["queues"] == 2 and os.path.exists(b)
        fe = RingFrontend(b)                 # served when add_port returns
        try:
            fe.post_rx(8)
            fe.send([bytes([7]) * 60] * 8)
            assert fe.wait_used(8) == 8
            got = []
            assert wait_for(lambda: got.extend(fe.received()) or len(got) == 8)
        finally:
            fe.close()
        url = f"http://127.0.0.1:{fw.metrics.port}/metrics"
        assert f'socket="{b}"' in urllib.request.urlopen(url, timeout=10).read().decode()
        with pytest.raises(ControlError, match="is port 1 already"):
            fw.add_port(b)
        with pytest.raises(ControlError, match="queue pairs per port"):
            fw.add_port(str(tmp_path / "c.sock"), queues=99)
        removed = fw.remove_port(b)
        assert removed["port"] == 1 and not os.path.exists(b)
        assert [p["port"] for p in fw.ports()] == [0]
        assert f'socket="{b}"' not in urllib.request.urlopen(url, timeout=10).read().decode()
        with pytest.raises(ControlError, match="no port"):
            fw.remove_port(b)
        # The index is free again, and its counters start from zero.
        again = fw.add_port(str(tmp_path / "d.sock"))
        assert again["port"] == 1
        assert fw.stats()[1]["rx_packets"] == 0
        assert fw.remove_port(1)["port"] == 1


def test_patch_keeps_two_ports(tmp_path):
    with Forwarder([str(tmp_path / "a.sock"), str(tmp_path / "b.sock")],
                   pipeline=["patch"]) as fw:
        with pytest.raises(ControlError, match="exactly two ports"):
            fw.add_port(str(tmp_path / "c.sock"))


# -- the control socket: its protocol and who may use it ------------------------------


@pytest.fixture
def master(tmp_path):
    with VhuMaster(tmp_path, "--app", "switch", sockets=("a.sock",)) as vhu:
        vhu.control = vhu.sockets[0] + ".ctl"
        assert wait_for(lambda: os.path.exists(vhu.control))
        yield vhu
        vhu.stop()
        assert not os.path.exists(vhu.control), "control socket left behind"


def raw(control, data, read=True, timeout=15.0):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(control)
        if data:
            s.sendall(data)
        if not read:
            return None
        buf = b""
        while not buf.endswith(b"\n"):
            more = s.recv(65536)
            if not more:
                break
            buf += more
        return [json.loads(line) for line in buf.splitlines()]


def test_ctl_commands_and_their_output(master, tmp_path):
    rc, show = ctl(master.control, "show")
    assert rc == 0 and show["ok"] and show["result"]["app"] == "switch"
    assert [p["socket"] for p in show["result"]["ports"]] == [master.sockets[0]]
    b = str(tmp_path / "b.sock")
    rc, added = ctl(master.control, "add-port", "--socket", b, "--queues", 2)
    assert rc == 0 and added["result"]["port"] == 1 and added["result"]["queues"] == 2
    rc, st = ctl(master.control, "stats", 1)
    assert rc == 0 and [p["port"] for p in st["result"]] == [1]
    rc, macs = ctl(master.control, "mac-table")
    assert rc == 0 and macs["result"] == []
    rc, lvl = ctl(master.control, "set-log-level", "debug")
    assert rc == 0 and lvl["result"] == "DEBUG"
    master.wait_log("log level set to DEBUG")
    # human output, exit statuses
    r = subprocess.run([sys.executable, "-m", "vhu.ctl", "--control", master.control, "show"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0 and re.search(r"port 1 +server .*b\.sock +down +queues 2", r.stdout)
    rc, err = ctl(master.control, "del-port", 7)
    assert rc == 1 and err == {"ok": False, "error": "no port 7"}
    rc, err = ctl(master.control, "add-port", "--socket", master.sockets[0])
    assert rc == 1 and "is port 0 already" in err["error"]
    rc, err = ctl(master.control, "add-port", "--socket", str(tmp_path / "nodir" / "x.sock"))
    assert rc == 1 and "No such file" in err["error"]
    rc, _ = ctl(master.control, "frobnicate")
    assert rc == 2
    rc, gone = ctl(master.control, "del-port", b)
    assert rc == 0 and gone["result"]["port"] == 1 and not os.path.exists(b)


def test_bad_requests_get_an_error_and_vhu_goes_on(master):
    c = master.control
    assert raw(c, b'{"cmd": "nope"}\n') == [{"ok": False, "error": "unknown command 'nope' (have "
                                             "add-port, del-port, show, stats, set-log-level, "
                                             "mac-table)"}]
    (bad,) = raw(c, b"this is not json\n")
    assert not bad["ok"] and bad["error"].startswith("not JSON")
    (bad,) = raw(c, b'["cmd", "show"]\n')
    assert not bad["ok"] and "object" in bad["error"]
    (bad,) = raw(c, b'{"cmd": "add-port"}\n')
    assert not bad["ok"] and "one of socket, tap or vxlan" in bad["error"]
    (bad,) = raw(c, b'{"cmd": "del-port", "port": true}\n')
    assert not bad["ok"]
    # A 10 MiB line: an error, then the connection is closed (the sender may
    # see a reset before it has written it all).
    try:
        (big,) = raw(c, b"x" * (10 << 20) + b"\n")
        assert not big["ok"] and "longer than" in big["error"]
    except (ConnectionResetError, BrokenPipeError):
        pass
    # Silence: told and closed after the idle timeout, without a request.
    t0 = time.monotonic()
    (idle,) = raw(c, b"", timeout=30)
    assert "no request" in idle["error"] and time.monotonic() - t0 >= 9
    # Two requests on one connection, each answered.
    two = raw(c, b'{"cmd": "show"}\n{"cmd": "stats"}\n')
    assert len(two) >= 1 and two[0]["ok"]
    rc, show = ctl(c, "show")
    assert rc == 0 and show["ok"]
    assert "Traceback" not in master.output()


def test_another_uid_is_refused(tmp_path):
    """The control socket's mode keeps other users out; even if it is widened
    by hand, their peer credentials are checked: refused and logged."""
    d = tempfile.mkdtemp(prefix="vhu-ctl-")
    os.chmod(d, 0o755)
    try:
        with VhuMaster(tmp_path, "--app", "sink", "--control", os.path.join(d, "c.ctl"),
                       sockets=("a.sock",)) as vhu:
            control = os.path.join(d, "c.ctl")
            assert wait_for(lambda: os.path.exists(control))
            assert os.stat(control).st_mode & 0o777 == 0o600
            rc, err = ctl(control, "show", user=65534)
            assert rc == 1 and "Permission denied" in err     # the mode: not even connected
            os.chmod(control, 0o666)
            rc, err = ctl(control, "show", user=65534)
            assert rc == 1 and isinstance(err, dict), err
            assert err["error"] == f"uid 65534 may not control this vhu (uid {os.getuid()})"
            vhu.wait_log("control: refused pid")
            rc, ok = ctl(control, "show")
            assert rc == 0 and ok["ok"]
    finally:
        os.rmdir(d) if not os.listdir(d) else None


def test_add_and_remove_a_port_100_times(tmp_path):
    """Each round: add a port, a front-end connects and moves frames, the
    port is removed (every other round while the front-end is still
    connected: vhu closes its connection). At the end vhu holds what it held at start (the
    VhuMaster balance check) and the socket files are gone."""
    with VhuMaster(tmp_path, "--app", "echo", sockets=("a.sock",)) as vhu:
        control = vhu.sockets[0] + ".ctl"
        assert wait_for(lambda: os.path.exists(control))
        from vhu.ctl import ask
        for i in range(100):
            path = str(tmp_path / f"p{i % 3}.sock")
            reply = ask(control, {"cmd": "add-port", "socket": path})
            assert reply["ok"] and reply["result"]["port"] == 1, reply
            fe = RingFrontend(path)
            try:
                fe.post_rx(4)
                fe.send([bytes([i & 0xFF]) * 60] * 4)
                assert fe.wait_used(4) == 4
                got = []
                assert wait_for(lambda: got.extend(fe.received()) or len(got) == 4), i
                if i % 2:       # removed under a front-end still connected
                    reply = ask(control, {"cmd": "del-port", "port": path})
                    assert reply["ok"] and not os.path.exists(path), reply
                    assert fe.fe.sock.recv(1) == b"", "vhu kept the removed port's connection"
            finally:
                fe.close()
            if not i % 2:
                reply = ask(control, {"cmd": "del-port", "port": path})
                assert reply["ok"] and not os.path.exists(path), reply
        vhu.stop()



def _by_index(vhu, index):
    """A port's counters by its index ({} until the stats file lists it:
    removed ports are not listed, and an added one from the next report)."""
    return next((p for p in vhu.stats()["ports"] if p["port"] == index), {})


@pytest.mark.skipif(not _tap_usable(), reason="needs root and /dev/net/tun")
def test_add_port_tap_and_client_socket_at_runtime(tmp_path):
    """On a running switch: `add-port --tap NAME` makes a TAP port that
    floods into port 0 and gets the frames port 0 addresses to what it
    learnt on it (the kernel counts them); `add-port --socket PATH --client`
    connects to a listening vhu.frontend, which sends N frames that vhu
    counts; both come out of show and stats, and go with del-port."""
    from tests.test_apps_engine import eth, mac
    name = f"vhuc{os.getpid() % 100000}"
    with VhuMaster(tmp_path, "--app", "switch", sockets=("a.sock",)) as vhu:
        control = vhu.sockets[0] + ".ctl"
        assert wait_for(lambda: os.path.exists(control))
        fe = RingFrontend(vhu.sockets[0])
        pkt = None
        try:
            rc, added = ctl(control, "add-port", "--tap", name)
            assert rc == 0 and added["result"]["port"] == 1, added
            assert added["result"]["kind"] == "tap" and os.path.exists(f"/sys/class/net/{name}")
            subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"], check=False)
            subprocess.run(["ip", "link", "set", name, "up"], check=True)
            pkt = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
            pkt.bind((name, 0))

            # The kernel sends out of the TAP: unknown unicast, flooded to port 0.
            fe.post_rx(64)
            out = [eth(mac(1), mac(9), 0x88B5, size=100, fill=i) for i in range(20)]
            for f in out:
                pkt.send(f)
            got = []
            assert wait_for(lambda: got.extend(f for f in fe.received() if f[12:14] == b"\x88\xb5")
                            or len(got) >= 20), f"{len(got)} of 20 TAP frames reached port 0"
            assert got == out

            # Port 0 answers mac(9), learnt on the TAP port: the kernel receives them.
            def kernel_rx():
                with open(f"/sys/class/net/{name}/statistics/rx_packets") as f:
                    return int(f.read())
            before = kernel_rx()
            fe.send([eth(mac(9), mac(1), 0x88B5, size=80, fill=100 + i) for i in range(10)])
            assert fe.wait_used(10) == 10
            assert wait_for(lambda: kernel_rx() - before >= 10), kernel_rx() - before
            assert wait_for(lambda: _by_index(vhu, 1).get("tx_packets", 0) >= 10)
            assert kernel_rx() - before == 10

            # A client-mode port, connecting to a front-end that listens.
            csock = str(tmp_path / "fe.sock")
            with frontend_process("--socket", csock, "--listen", "--mode", "tx", "--count", 5000,
                                  "--duration", 60, "--quiet") as sender:
                assert wait_for(lambda: os.path.exists(csock))
                rc, added = ctl(control, "add-port", "--socket", csock, "--client")
                assert rc == 0 and added["result"]["port"] == 2, added
                assert added["result"]["mode"] == "client"
                r = subprocess.run([sys.executable, "-m", "vhu.ctl", "--control", control, "show"],
                                   capture_output=True, text=True, cwd=REPO, timeout=60)
                assert r.returncode == 0, r.stderr
                assert re.search(rf"port 1  tap {name}  up", r.stdout), r.stdout
                assert re.search(r"port 2  client .*fe\.sock", r.stdout), r.stdout
                text, err = sender.communicate(timeout=90)
            assert sender.returncode == 0, err
            assert "tx 5000 packets" in text, text
            assert wait_for(lambda: _by_index(vhu, 2).get("rx_packets") == 5000), _by_index(vhu, 2)

            rc, gone = ctl(control, "del-port", 2)
            assert rc == 0 and gone["result"]["port"] == 2
            rc, gone = ctl(control, "del-port", 1)
            assert rc == 0 and gone["result"]["kind"] == "tap"
            assert wait_for(lambda: not os.path.exists(f"/sys/class/net/{name}")), \
                "the TAP outlived its port"
            assert wait_for(lambda: [p["port"] for p in vhu.stats()["ports"]] == [0])
        finally:
            if pkt is not None:
                pkt.close()
            fe.close()
        vhu.stop()


# -- with DPDK: the port left alone never stops --------------------------------------


@pytest.mark.peers("testpmd")
def test_ports_come_and_go_while_testpmd_streams_into_port_0(tmp_path):
    """--app switch. testpmd 0 sends into port 0 (unknown unicast: flooded);
    port 1 is added, a second testpmd connects and receives; port 1 is
    removed. Port 0's count equals what testpmd 0 sent, and its rate never
    fell to 0 during either command."""
    with VhuMaster(tmp_path, "--app", "switch", "--cpus", VHU_CPU, sockets=("a.sock",),
                   stats_interval=0.1) as vhu:
        control = vhu.sockets[0] + ".ctl"
        from vhu.ctl import ask
        samples, stop = [], threading.Event()

        def sample():
            while not stop.is_set():
                try:
                    samples.append((time.monotonic(), vhu.port(0)["rx_packets"]))
                except Exception:
                    pass
                time.sleep(0.1)
        with Testpmd([virtio_user_vdev(vhu.sockets[0])], forward_mode="txonly", cpus=PEER_CPU,
                     huge=False, nb_cores=1) as tp0:
            tp0.wait_link_up(0)
            tp0.start()
            mon = threading.Thread(target=sample, daemon=True)
            mon.start()
            time.sleep(1)
            b = str(tmp_path / "b.sock")
            assert ask(control, {"cmd": "add-port", "socket": b})["ok"]
            with Testpmd([virtio_user_vdev(b)], forward_mode="rxonly", cpus=PEER_CPU,
                         huge=False, nb_cores=1) as tp1:
                tp1.wait_link_up(0)
                tp1.start()
                assert wait_for(lambda: tp1.port_stats()[0]["rx_packets"] > 1000, 20), \
                    "flooded frames never reached the added port"
                reply = ask(control, {"cmd": "del-port", "port": 1})
                assert reply["ok"], reply
                assert wait_for(lambda: not tp1.link_up(0), 20), "its link stayed up"
                tp1.stop()
            time.sleep(1)
            stop.set()
            mon.join(5)
            sent = tp0.stop()[0]["tx_packets"]
        assert vhu.wait_stable("rx_packets", port=0) == sent
        longest, still = 0.0, None
        for (t0, n0), (t1, n1) in zip(samples, samples[1:]):
            still = (still or t0) if n1 == n0 else None
            if still is not None:
                longest = max(longest, t1 - still)
        assert longest < 1.0, f"port 0 stood still {longest:.2f} s"
        vhu.stop()


# -- with QEMU: a guest's port comes and goes under it ---------------------------------


@pytest.mark.peers("qemu")
def test_guest_on_a_port_added_at_runtime_and_removed_under_it():
    """Guest A on the port vhu started with; guest B's port added at runtime:
    they ping each other. B's port removed while B runs: A is unaffected
    (link up, still served), B sees its link go down (QEMU's reconnect finds
    no socket)."""
    from tests.test_guests import BOOT_TIMEOUT, IP_A, IP_B, MAC_A, MAC_B, Short, assert_ping
    from vhu.ctl import ask
    from vhu.testbed.guest import Guest
    d = Short()
    vhu = VhuMaster(d, "--app", "switch", "--cpus", VHU_CPU, sockets=("a.sock",))
    guests = []
    try:
        vhu.wait_sockets()
        vhu.wait_started()
        control = vhu.sockets[0] + ".ctl"
        guests.append(Guest(d / "a.sock", ip=f"{IP_A}/24", mac=MAC_A, cpu=PEER_CPU,
                            name=f"vhu-ctl-a-{os.getpid()}", log_path=d / "a.console").launch())
        b_sock = d / "b.sock"
        reply = ask(control, {"cmd": "add-port", "socket": b_sock})
        assert reply["ok"] and reply["result"]["port"] == 1, reply
        guests.append(Guest(b_sock, ip=f"{IP_B}/24", mac=MAC_B, cpu=PEER_CPU, reconnect=1,
                            name=f"vhu-ctl-b-{os.getpid()}", log_path=d / "b.console").launch())
        a, b = guests
        a.wait_ready(BOOT_TIMEOUT)
        b.wait_ready(BOOT_TIMEOUT)
        assert_ping(a, IP_B, count=10)
        assert_ping(b, IP_A, count=10)
        show = ask(control, {"cmd": "show"})["result"]
        assert [p["connected"] for p in show["ports"]] == [True, True], show
        assert ask(control, {"cmd": "del-port", "port": b_sock})["ok"]
        assert not os.path.exists(b_sock)

        def link(g):
            out, _ = g.run("cat /sys/class/net/eth0/operstate")
            return out.strip()
        assert wait_for(lambda: link(b) == "down", 30), "the removed guest's link stayed up"
        assert link(a) == "up"
        before = vhu.port(0)["rx_packets"]
        a.ping(IP_B, count=3, deadline=5)          # nobody answers now; vhu still serves A
        assert wait_for(lambda: vhu.port(0)["rx_packets"] > before, 10)
        assert [p["port"] for p in vhu.stats()["ports"]] == [0]
        assert b.alive() and a.alive()
    finally:
        for g in guests:
            g.close()
        try:
            vhu.stop()
        finally:
            d.remove()
