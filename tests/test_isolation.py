"""One front-end cannot stall, kill or mislead the service of another.

One vhu.master, --app sink, one worker: port B carries DPDK virtio-user
txonly for the whole module while port A, on the same worker, runs each
attack in turn: a call fd that is a pipe, a call eventfd saturated so that
every signal would block, its memfd truncated under the worker (SIGBUS),
10 000 enable toggles, the worker SIGKILLed and SIGSTOPped, a regular file
and a hung-up pipe as kick fds, an 800 KiB chain, and (on a master of its
own, with the no_ipv6 stage) a second thread rewriting the EtherType the
stage decides on. After each: B was never
without service for more than a second (vhu's counter and testpmd's own
per-second rate), the master is alive; at the end vhu's count for B equals
testpmd's TX-packets (exactly, but for at most one batch per worker
replacement), and the master exits 0 on SIGTERM having given back every
process, fd and mapping (tests.vhuproc).

Then, with vhu in client mode: a front-end whose listening socket never
accepts (full backlog) on A does not keep testpmd server=1 on B from being
served within 2 s. And the soak: 100 worker kills and 100 front-end
sessions, balance checked at the end.
"""
import os
import signal
import socket
import threading
import time

import pytest

from tests.rawfront import RingFrontend
from tests.test_master_hostile import Frontend
from tests.vhuproc import VhuMaster
from vhu.protocol.messages import Request as R, U64
from vhu.testbed.dpdk import Testpmd, virtio_user_vdev
from vhu.workers.supervisor import PACKET_INTERVAL, WORKER_DEADLINE

Testpmd.__test__ = False

pytestmark = pytest.mark.peers("testpmd")
VHU_CPU, PEER_CPU = "0", 1
BATCH = 32
MAX_STALL = 1.0


class Monitor(threading.Thread):
    """Samples port B: vhu's counter (b_count(), every 0.1 s) and testpmd's
    own TX counter (once a second): the longest time either stood still,
    since a mark."""

    def __init__(self, b_count, tp):
        super().__init__(daemon=True)
        self.b_count, self.tp = b_count, tp
        self.samples, self.tp_samples = [], []
        self.stopped = threading.Event()
        self.lock = threading.Lock()

    def run(self):
        next_tp = time.monotonic()
        while not self.stopped.is_set():
            try:
                n = self.b_count()
            except Exception:
                n = None
            now = time.monotonic()
            with self.lock:
                if n is not None:
                    self.samples.append((now, n))
                if now >= next_tp:
                    next_tp = now + 1.0
                    try:
                        self.tp_samples.append((now, self.tp.port_stats()[0]["tx_packets"]))
                    except Exception:
                        pass
            time.sleep(0.1)

    def mark(self):
        return time.monotonic()

    @staticmethod
    def _longest_still(samples, since):
        longest, still_from, last = 0.0, None, None
        for t, n in samples:
            if t < since:
                last = n
                continue
            if last is not None and n == last:
                still_from = still_from if still_from is not None else t
                longest = max(longest, t - still_from)
            else:
                still_from = None
            last = n
        return longest

    def assert_served(self, since, what):
        # Let a second pass after the attack, so a stall that started at its
        # end is seen.
        time.sleep(1.2)
        with self.lock:
            vhu_gap = self._longest_still(self.samples, since)
            tp = [(t, n) for t, n in self.tp_samples if t >= since - 1.0]
        assert vhu_gap <= MAX_STALL, f"{what}: port B not served for {vhu_gap:.2f} s"
        rates = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(tp, tp[1:])]
        assert rates and min(rates) > 0, f"{what}: testpmd's per-second TX rate fell to 0: {rates}"

    def stop(self):
        self.stopped.set()
        self.join(5)


@pytest.fixture(scope="module")
def iso(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("isolation")
    vhu = VhuMaster(tmp, "--app", "sink", "--workers", "1", "--cpus", VHU_CPU,
                    sockets=("a.sock", "b.sock"), stats_interval=0.1)
    with vhu:
        tp = Testpmd([virtio_user_vdev(vhu.sockets[1])], forward_mode="txonly", cpus=PEER_CPU,
                     huge=False, nb_cores=1)
        with tp:
            tp.wait_link_up(0)
            tp.start()
            mon = Monitor(lambda: vhu.port(1)["rx_packets"], tp)
            mon.start()
            state = type("Iso", (), {})()
            state.vhu, state.tp, state.mon, state.a = vhu, tp, mon, vhu.sockets[0]
            try:
                yield state
            finally:
                mon.stop()
                tx = tp.stop()[0]["tx_packets"]
                tp.close()
        got = vhu.wait_stable("rx_packets", port=1, settle=1.0)
        replaced = sum(w["replaced"] for w in vhu.stats()["workers"])
        assert tx <= got <= tx + BATCH * replaced, (
            f"port B: vhu counted {got}, testpmd sent {tx} ({replaced} worker replacements)")
        assert vhu.proc.poll() is None, f"master died:\n{vhu.output()[-4000:]}"
    assert vhu.proc.returncode == 0, f"master exit status {vhu.proc.returncode}"


def a_port(iso):
    return iso.vhu.port(0)


def wait_for(cond, timeout=20.0):
    t = time.monotonic() + timeout
    while time.monotonic() < t:
        if cond():
            return True
        time.sleep(0.05)
    return False


def worker_pid(iso):
    return iso.vhu.stats()["workers"][0]["pid"]


def test_call_fd_that_is_a_pipe_is_refused(iso):
    since = iso.mon.mark()
    r, w = os.pipe()
    fe = Frontend(iso.a).negotiate()
    try:
        assert fe.ack(R.SET_VRING_CALL, U64(1).pack(), fds=[w]) == 1    # refused
        iso.vhu.wait_log("SET_VRING_CALL ring 1: fd is not an eventfd (pipe:")
    finally:
        fe.close()
        os.close(r)
        os.close(w)
    iso.mon.assert_served(since, "pipe as call fd")


def test_saturated_call_eventfd_never_blocks_the_worker(iso):
    """An eventfd one short of its maximum: every interrupt vhu sends A would
    block a blocking write. vhu's writes are non-blocking: A's frames are
    all used, B goes on."""
    since = iso.mon.mark()
    call = os.eventfd(0, os.EFD_NONBLOCK)
    os.eventfd_write(call, 0xFFFFFFFFFFFFFFFE)
    a = RingFrontend(iso.a, call_fd=call)
    try:
        for _ in range(40):
            a.send([bytes(60)] * 50)
            assert a.wait_used(50) == 50
    finally:
        a.close()
        os.close(call)
    iso.mon.assert_served(since, "saturated call eventfd")


def test_truncated_memory_cuts_off_that_port_alone(iso):
    """A front-end shrinks its memfd under the worker, twice: each time the
    worker dies of SIGBUS, the fault is put on port A (broken_memory_fault,
    disconnected, refused for a while, longer the second time), the worker
    is replaced and B resumes within a second."""
    for attempt in (1, 2):
        since = iso.mon.mark()
        before = worker_pid(iso)
        faults = a_port(iso)["broken"].get("memory_fault", 0)
        a = RingFrontend(iso.a, name="vhu-shrinking")
        a.send([bytes(60)] * 4)
        assert a.wait_used(4) == 4
        drv = a.drivers[1]
        gpa = 0x100000
        a.mem.write(gpa, bytes(72))
        drv.add([(gpa, 72)])
        drv.publish()
        os.ftruncate(a.fd, 0)                       # nothing of ours touches it after this
        os.eventfd_write(a.kicks[1], 1)
        assert a.fe.wait_closed(10), "the faulting front-end was not disconnected"
        a.fe.close()
        for fd in [a.fd, *a.kicks.values(), *a.calls.values()]:
            os.close(fd)
        a.drivers.clear()
        a.mem.clear()
        assert wait_for(lambda: worker_pid(iso) != before), "worker not replaced"
        iso.vhu.wait_log("killed by SIGBUS", count=attempt)
        iso.vhu.wait_log("in port 0's memory", count=attempt)
        assert wait_for(lambda: a_port(iso)["broken"].get("memory_fault", 0) > faults)
        iso.mon.assert_served(since, f"SIGBUS from port A's memory (#{attempt})")
    # Still refused for a while after the second fault; then served again.
    penalty = iso.vhu.output().count("not served for 2 s")
    assert penalty == 1, iso.vhu.output()[-3000:]
    assert wait_for(lambda: _serves(iso.a), 10)


def _serves(path):
    try:
        fe = Frontend(path, timeout=1.0)
        try:
            fe.call(R.GET_FEATURES)
            return True
        finally:
            fe.close()
    except OSError:
        return False


def cpu_seconds(pid):
    """User + system CPU time of one process (not its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_ten_thousand_enable_toggles_cost_b_nothing(iso):
    """10 000 SET_VRING_ENABLE toggles on A, in about 6 s: they reach the
    worker B shares as at most one coalesced command packet per 10 ms, and
    B's rate during them is never halved. On two cores the toggling
    front-end and the master share CPUs with B's worker and testpmd, so the
    control is the same control-plane load with nothing for a worker to do:
    GET_FEATURES round trips at the same pace. The toggles and the control
    alternate in four rounds, because this machine's rates flip between two
    modes several times a minute (perf/PROFILE.md, Noise): one long phase of
    each would compare the modes, not the messages."""
    a = RingFrontend(iso.a)
    rounds, per_round = 4, 2500

    def b_while(act):
        """B's packets and the stats reports' own seconds around act();
        also act's own seconds and the worker's command packets."""
        before, t0 = iso.vhu.stats(), time.monotonic()
        act()
        took = time.monotonic() - t0
        acted = time.time()          # the stats file trails: wait for a report after the act
        assert wait_for(lambda: iso.vhu.stats()["time"] > acted), "no stats report"
        after = iso.vhu.stats()
        return dict(packets=after["ports"][1]["rx_packets"] - before["ports"][1]["rx_packets"],
                    seconds=after["time"] - before["time"], took=took,
                    commands=after["workers"][0]["packets"] - before["workers"][0]["packets"])

    def paced(message, first):
        for i in range(first, first + per_round):
            message(i)
            if i % 100 == 99:
                time.sleep(0.06)             # 100 messages every 60 ms or so
        a.fe.call(R.GET_FEATURES)            # every message has been handled

    def rate(phases):
        return sum(p["packets"] for p in phases) / sum(p["seconds"] for p in phases)

    try:
        idle = b_while(lambda: time.sleep(1))
        control, toggled = [], []
        since = iso.mon.mark()
        for r in range(rounds):
            control.append(b_while(lambda: paced(lambda i: a.fe.call(R.GET_FEATURES), 0)))
            # i runs on across rounds; each round starts with a disable and
            # ends with an enable (per_round is even).
            toggled.append(b_while(lambda: paced(lambda i: a.toggle(1, i % 2 == 1),
                                                 r * per_round)))
        commands = sum(p["commands"] for p in toggled)
        seconds = sum(p["took"] for p in toggled)
        print(f"port B: {rate([idle]) / 1e6:.2f} Mpps idle, {rate(control) / 1e6:.2f} Mpps "
              f"during {rounds * per_round} GET_FEATURES, {rate(toggled) / 1e6:.2f} Mpps during "
              f"{rounds * per_round} toggles (by round: "
              f"{' '.join(f'{rate([c]) / 1e6:.1f}/{rate([t]) / 1e6:.1f}' for c, t in zip(control, toggled))}"
              f"); worker command packets {sum(p['commands'] for p in control)} and {commands} "
              f"in {seconds:.1f} s of toggles")
        # What bounds the toggles' cost to B: they reach the worker B shares
        # coalesced, at most one command packet per supervisor.PACKET_INTERVAL
        # (each applies the last state of A's ring in place, nothing rebound).
        assert commands <= seconds / PACKET_INTERVAL + 2 * rounds, (commands, seconds)
        # B's rate under the same control-plane load, toggles against
        # GET_FEATURES: never halved.
        assert rate(toggled) >= 0.5 * rate(control), (control, toggled)
        # The last toggle enabled A's TX ring again: it is served.
        a.send([bytes(60)] * 10)
        assert a.wait_used(10) == 10
    finally:
        a.close()
    iso.mon.assert_served(since, f"{rounds * per_round} enable toggles")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_dead_or_hung_worker_is_replaced_within_a_second(iso, sig):
    a = RingFrontend(iso.a)
    try:
        a.send([bytes(60)] * 8)
        assert a.wait_used(8) == 8
        since = iso.mon.mark()
        pid = worker_pid(iso)
        os.kill(pid, sig)
        t0 = time.monotonic()
        assert wait_for(lambda: worker_pid(iso) != pid, 10)
        took = time.monotonic() - t0
        # Seen through the stats file (rewritten every 0.1 s): a dead worker
        # is replaced within a second; a hung one is presumed hung after
        # supervisor.WORKER_DEADLINE of silence, and replaced within a second.
        limit = 1.0 + (WORKER_DEADLINE if sig == signal.SIGSTOP else 0)
        print(f"worker {signal.Signals(sig).name}: replaced after {took:.2f} s")
        assert took < limit, (took, limit)
        # A's rings were replayed into the new worker too: A is still served.
        a.send([bytes(60)] * 8)
        assert a.wait_used(8) == 8
    finally:
        a.close()
    iso.mon.assert_served(since, f"worker {signal.Signals(sig).name}")
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10), "old worker not reaped"


@pytest.mark.parametrize("kind", ["regular file", "hung-up pipe"])
def test_kick_fd_that_is_not_an_eventfd_is_refused_once(iso, tmp_path, kind):
    since = iso.mon.mark()
    if kind == "regular file":
        fd = os.open(tmp_path / "kick", os.O_RDWR | os.O_CREAT, 0o600)
        extra = []
    else:
        fd, w = os.pipe()
        os.close(w)                                # EPOLLHUP for ever
        extra = []
    fe = Frontend(iso.a).negotiate()
    try:
        log_before = iso.vhu.output()
        assert fe.ack(R.SET_VRING_KICK, U64(1).pack(), fds=[fd]) == 1
        iso.vhu.wait_log("SET_VRING_KICK ring 1: fd is not an eventfd",
                         count=log_before.count("SET_VRING_KICK ring 1: fd is not an eventfd") + 1)
        new = iso.vhu.output()[len(log_before):]
        assert "Traceback" not in new, new
    finally:
        fe.close()
        os.close(fd)
        for e in extra:
            os.close(e)
    iso.mon.assert_served(since, f"{kind} as kick fd")


def test_800_kib_chain_is_dropped_and_counted(iso):
    """200 descriptors on one 4 KiB page: 819 200 bytes that claim to be one
    frame. vhu returns the chain, counts it tx_too_big, delivers nothing."""
    since = iso.mon.mark()
    a = RingFrontend(iso.a)
    try:
        before = a_port(iso)
        a.send_chain(200)
        assert a.wait_used(1) == 1
        assert wait_for(lambda: a_port(iso)["drops_by_reason"].get("tx_too_big", 0)
                        == before["drops_by_reason"].get("tx_too_big", 0) + 1)
        assert a_port(iso)["rx_packets"] == before["rx_packets"]
    finally:
        a.close()
    iso.mon.assert_served(since, "800 KiB chain")


def test_stage_bypass_attempt_on_a_leaves_the_filter_whole_and_b_served(tmp_path):
    """The README's no_ipv6 stage in front of the switch, one worker, ports
    A, B and C. B carries testpmd txonly throughout (IPv4 to an unknown MAC:
    flooded to A and C); A sends IPv6 frames to C while a second thread
    flips their EtherType (IPv6 <-> not) in A's buffers. Not one IPv6 frame
    of A's reaches C; B was never without service for more than a second
    and vhu counted exactly what testpmd sent."""
    from tests.test_private_copies import IPV6, MAC_A, MAC_C, frame, no_ipv6, pump_while_flipping
    from vhu.workers.forwarder import Forwarder
    paths = [str(tmp_path / f"{n}.sock") for n in "abc"]
    with Forwarder(paths, pipeline=[no_ipv6, "switch"], workers=1, poll="busy",
                   cpus=(int(VHU_CPU),), stats_interval=0.1) as fw:
        a, c = RingFrontend(paths[0]), RingFrontend(paths[2])
        try:
            c.send([frame(b"\xff" * 6, MAC_C, 0x0800, 0)])     # the switch learns C
            assert c.wait_used(1) == 1
            with Testpmd([virtio_user_vdev(paths[1])], forward_mode="txonly", cpus=PEER_CPU,
                         huge=False, nb_cores=1) as tp:
                tp.wait_link_up(0)
                tp.start()
                mon = Monitor(lambda: fw.stats()[1]["rx_packets"], tp)
                mon.start()
                try:
                    assert wait_for(lambda: fw.stats()[1]["rx_packets"] > 1000), "B not served"
                    since = mon.mark()       # 0x86DD (IPv6) <-> 0x86DC in A's buffers
                    (got,) = pump_while_flipping(a, 13, (0xDD, 0xDC), [c],
                                                 frame(MAC_C, MAC_A, IPV6, 0))
                    mon.assert_served(since, "stage-bypass attempt")
                finally:
                    mon.stop()
                sent = tp.stop()[0]["tx_packets"]
        finally:
            a.close()
            c.close()
        from_a = [f for f in got if f[6:12] == MAC_A]
        leaked = [f for f in from_a if f[12:14] == IPV6.to_bytes(2, "big")]
        dropped = fw.stats()[0]["drops_by_reason"]["stage"]
        assert not leaked, f"{len(leaked)} IPv6 frames got through the filter"
        assert from_a and dropped, f"the race was not exercised: {len(from_a)} passed, {dropped} dropped"
        assert wait_for(lambda: fw.stats()[1]["rx_packets"] >= sent), (fw.stats()[1], sent)
        assert fw.stats()[1]["rx_packets"] == sent > 1000


def test_master_gives_no_traceback_for_any_of_it(iso):
    out = iso.vhu.output()
    assert "Traceback" not in out, out[-4000:]


# -- client mode ------------------------------------------------------------------


def test_frontend_that_never_accepts_does_not_freeze_the_master(tmp_path):
    """vhu --client toward A, whose listening socket is full and never
    accepts: a blocking connect(2) would hang there. vhu's does not: testpmd
    server=1 on B is served within 2 s of listening, and counted exactly."""
    a_path, b_path = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(a_path)
    listener.listen(0)
    fillers = []
    while True:                              # fill its backlog
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(a_path)
        except BlockingIOError:
            s.close()
            break
        fillers.append(s)
    try:
        with VhuMaster(tmp_path, "--client", "--app", "sink", "--cpus", VHU_CPU,
                       sockets=("a.sock", "b.sock")) as vhu:
            vhu.wait_log("port 0: waiting for a front-end")
            assert "its backlog is full" in vhu.output()
            tp = Testpmd([virtio_user_vdev(b_path, server=True)], forward_mode="txonly",
                         cpus=PEER_CPU, huge=False, nb_cores=1)
            launched = threading.Thread(target=tp.launch)
            launched.start()
            assert wait_for(lambda: tp.proc is not None and
                            "waiting for client connection" in tp.output, 30)
            t0 = time.monotonic()
            vhu.wait_log("port 1: front-end connected")
            took = time.monotonic() - t0
            launched.join(30)
            try:
                assert took < 2.0, f"B served {took:.2f} s after it listened"
                tp.wait_link_up(0)
                sent = tp.run_for(1.0)[0]["tx_packets"]
                assert sent > 0
                assert vhu.wait_stable("rx_packets", port=1) == sent
            finally:
                tp.close()
            vhu.wait_log("port 1: disconnected")
            vhu.stop()                       # balanced, exit status 0
    finally:
        for s in fillers:
            s.close()
        listener.close()


# -- soak ----------------------------------------------------------------------------


def test_soak_100_worker_kills_and_100_sessions(tmp_path):
    """Every kill is followed by a replacement; every session by a release:
    at the end vhu holds what it held at start (the balance check of
    VhuMaster), with no zombie."""
    with VhuMaster(tmp_path, "--app", "echo", "--workers", "2", "--queues", "2",
                   sockets=("a.sock",)) as vhu:
        for i in range(100):
            pid = vhu.stats()["workers"][i % 2]["pid"]
            os.kill(pid, signal.SIGKILL)
            assert wait_for(lambda: vhu.stats()["workers"][i % 2]["pid"] != pid, 10), i
            a = RingFrontend(vhu.sockets[0])
            try:
                a.post_rx(4)
                a.send([bytes([i & 0xFF]) * 60] * 4)
                assert a.wait_used(4) == 4
                got = []
                assert wait_for(lambda: got.extend(a.received()) or len(got) == 4, 10), i
                assert got == [bytes([i & 0xFF]) * 60] * 4
            finally:
                a.close()
        assert sum(w["replaced"] for w in vhu.stats()["workers"]) == 100
        vhu.stop()                           # balanced, exit status 0
