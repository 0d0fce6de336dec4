"""python -m vhu.master against hostile, legacy and careless front-ends, end to end.

A raw vhost-user client (a socket and SCM_RIGHTS, nothing from vhu's own
sending code) sends every kind of malformed message to port 0 of one
module-wide master with two ports, while dpdk-testpmd (virtio-user, txonly)
streams into port 1: each bad message gets its failure reply or closes that
connection only, is logged with its reason, leaves no fd behind in the master
or its workers, and port 0 then serves the next front-end while port 1 keeps
counting (exactly, checked at the end). Then: a hostile ring, 100
connect/use/disconnect cycles without a leak, signals, stale and live socket
files, socket modes and bad arguments; the front-end with rings is the Vapp
reference client (tests/vapp.py, exact; its own tests are in test_vapp.py).

Without dpdk-testpmd (and CI unset) the port-1 traffic checks are skipped;
everything else runs.
"""
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time

import pytest

from tests._peers_plugin import IN_CI, peer_missing_reason
from tests.vapp import NO_NEXT, RING_SIZE, TX, VappClient
from tests.vhuproc import REPO, VhuMaster
from vhu.protocol.messages import (
    FLAG_NEED_REPLY, FLAG_REPLY, HEADER, VERSION, MemoryRegion, MemoryTable,
    ProtocolFeature as PF, Request as R, SingleMemoryRegion, U64, VirtioFeature as VF, VringAddr, VringState, mask,
)
from vhu.testbed.dpdk import Testpmd, virtio_user_vdev
from vhu.testbed.procs import descendants, process_tree

Testpmd.__test__ = False   # a peer, not a test class

REASON = peer_missing_reason(("testpmd",))     # port 1's traffic; port 0's checks run without it
VHU_CPU, PEER_CPU = "0", 1

GPA, UVA = 0x0, 0x7F00_0000_0000
MEM_SIZE = 4 << 20
CASE_RING_SIZE = 256          # ring 0's size in the ring address cases
NEGOTIATED = mask(VF.VERSION_1, VF.PROTOCOL_FEATURES)
PROTOCOL = mask(PF.MQ, PF.REPLY_ACK, PF.CONFIGURE_MEM_SLOTS)


# -- a raw front-end ------------------------------------------------------------


class Frontend:
    """A vhost-user front-end that sends exactly what it is told, garbage included."""

    def __init__(self, path, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)

    def close(self):
        self.sock.close()

    def send_raw(self, data, fds=()):
        if fds:
            socket.send_fds(self.sock, [bytes(data)], list(fds))
        else:
            self.sock.sendall(bytes(data))

    def send(self, request, payload=b"", *, flags=VERSION, need_reply=False, fds=(), size=None):
        flags |= FLAG_NEED_REPLY if need_reply else 0
        header = HEADER.pack(int(request), flags, len(payload) if size is None else size)
        self.send_raw(header + bytes(payload), fds)

    def recv_exact(self, n):
        out = b""
        while len(out) < n:
            more = self.sock.recv(n - len(out))
            if not more:
                raise EOFError(f"back-end closed the connection ({len(out)} of {n} bytes)")
            out += more
        return out

    def reply(self, request):
        req, flags, size = HEADER.unpack(self.recv_exact(HEADER.size))
        assert req == int(request), f"reply to {req}, expected {int(request)}"
        assert flags == VERSION | FLAG_REPLY, f"reply flags {flags:#x}"
        return self.recv_exact(size)

    def call(self, request, payload=b""):
        """A request that always replies (GET_*)."""
        self.send(request, payload)
        return self.reply(request)

    def ack(self, request, payload=b"", fds=()):
        """Send with NEED_REPLY; the REPLY_ACK u64 (0 = success)."""
        self.send(request, payload, need_reply=True, fds=fds)
        reply = self.reply(request)
        assert len(reply) == 8, f"REPLY_ACK payload of {len(reply)} bytes"
        return U64.STRUCT.unpack(reply)[0]

    def negotiate(self):
        """What QEMU and DPDK do first: features, protocol features with REPLY_ACK."""
        self.send(R.SET_OWNER)
        offered = U64.STRUCT.unpack(self.call(R.GET_FEATURES))[0]
        assert offered & NEGOTIATED == NEGOTIATED
        self.send(R.SET_FEATURES, U64(NEGOTIATED).pack())
        proto = U64.STRUCT.unpack(self.call(R.GET_PROTOCOL_FEATURES))[0]
        assert proto & PROTOCOL == PROTOCOL
        assert self.ack(R.SET_PROTOCOL_FEATURES, U64(PROTOCOL).pack()) == 0
        return self

    def wait_closed(self, timeout=10.0):
        """True once the back-end has closed the connection (whatever it sent first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.sock], [], [], 0.1)[0]:
                try:
                    if not self.sock.recv(4096):
                        return True
                except ConnectionResetError:
                    return True
        return False


def mem_table(*regions):
    """SET_MEM_TABLE payload from (gpa, size, uva, offset) tuples."""
    return MemoryTable(tuple(MemoryRegion(*r) for r in regions)).pack()


def memfd(size=MEM_SIZE, name="vhu-hostile"):
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


# -- what the master and its workers hold --------------------------------------------


def held_files(pids):
    """(st_dev, st_ino) of every fd the processes hold."""
    out = set()
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for n in names:
            try:
                st = os.stat(f"/proc/{pid}/fd/{n}")
            except OSError:
                continue
            out.add((st.st_dev, st.st_ino))
    return out


def resources(pid):
    """{pid: (open fds, memfd mapping lines)} for the master and each child."""
    out = {}
    for p in process_tree(pid):
        try:
            fds = len(os.listdir(f"/proc/{p}/fd"))
            with open(f"/proc/{p}/maps") as f:
                maps = sum("/memfd:" in line for line in f)
        except OSError:
            continue
        out[p] = (fds, maps)
    return out


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


# -- the module's master: port 0 takes the abuse, port 1 carries real traffic ---------


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    with VhuMaster(tmp, "--app", "sink", "--cpus", VHU_CPU, sockets=("p0.sock", "p1.sock")) as vhu:
        yield vhu
        assert vhu.proc.poll() is None, f"master died:\n{vhu.output()[-4000:]}"
        assert "Traceback" not in vhu.output(), vhu.output()[-4000:]
        vhu.stop()


@pytest.fixture(scope="module")
def traffic(master, request):
    """testpmd (virtio-user, txonly) streaming into port 1 for the whole module
    (not with -m "not peers": the port-0 checks then run without it)."""
    if "not peers" in (request.config.getoption("markexpr") or ""):
        yield None
        return
    if REASON:
        if IN_CI:
            pytest.fail(f"CI=true but {REASON}", pytrace=False)
        yield None
        return
    tp = Testpmd([virtio_user_vdev(master.sockets[1])], forward_mode="txonly", cpus=PEER_CPU,
                 huge=False, nb_cores=1)
    with tp:
        tp.wait_link_up(0)
        tp.start()
        yield tp


_port1 = {"last": 0}


def check_port1_counting(master, traffic, timeout=10.0):
    """Port 1's receive counter has moved since the last check: still served."""
    if traffic is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = master.port(1)["rx_packets"]
        if now > _port1["last"]:
            _port1["last"] = now
            return
        time.sleep(0.05)
    raise AssertionError(f"port 1 stopped counting at {_port1['last']}")


def check_serves_next_frontend(path):
    """A well-behaved front-end is served on the port after the bad one."""
    fe = Frontend(path).negotiate()
    fd = memfd(1 << 20, "vhu-good")
    try:
        assert fe.ack(R.SET_MEM_TABLE, mem_table((0, 1 << 20, UVA, 0)), fds=[fd]) == 0
        assert fe.ack(R.SET_VRING_NUM, VringState(0, 256).pack()) == 0
        assert U64.STRUCT.unpack(fe.call(R.GET_FEATURES))[0] & NEGOTIATED == NEGOTIATED
    finally:
        fe.close()
        os.close(fd)


class Kit:
    """fds a hostile case sends; after the case none may still be held by vhu."""

    def __init__(self):
        self.fds, self.watch = [], []

    def pipe(self):
        r, w = os.pipe()
        self.fds += [r, w]
        self.watch.append(r)
        return r

    def memfd(self, size=MEM_SIZE, name="vhu-hostile-case", watch=True):
        fd = memfd(size, name)
        self.fds.append(fd)
        if watch:
            self.watch.append(fd)
        return fd

    def devnull(self):
        fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        self.fds.append(fd)          # not watched: the master may hold /dev/null itself
        return fd

    def identities(self):
        return {(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in self.watch}

    def close(self):
        for fd in self.fds:
            os.close(fd)


def region(size=MEM_SIZE, gpa=GPA, uva=UVA, off=0):
    return (gpa, size, uva, off)


def _mem_then(fe, kit):
    """A valid memory table and ring 0's size first (for the ring address cases)."""
    assert fe.ack(R.SET_MEM_TABLE, mem_table(region()), fds=[kit.memfd(watch=False)]) == 0
    assert fe.ack(R.SET_VRING_NUM, VringState(0, CASE_RING_SIZE).pack()) == 0


def _bad_table(*regions, nfds=None, fd_kind="memfd", size=MEM_SIZE):
    def send(fe, kit):
        n = len(regions) if nfds is None else nfds
        make = {"memfd": lambda: kit.memfd(size), "pipe": kit.pipe, "devnull": kit.devnull}[fd_kind]
        fe.send(R.SET_MEM_TABLE, mem_table(*regions), need_reply=True, fds=[make() for _ in range(n)])
    return send


def one_region(*r):
    """ADD_MEM_REG / REM_MEM_REG payload."""
    return SingleMemoryRegion(MemoryRegion(*r)).pack()


def _add_region_first(fe, kit):
    assert fe.ack(R.ADD_MEM_REG, one_region(*region()), fds=[kit.memfd(watch=False)]) == 0


def _add_region(r, fd_kind="memfd"):
    def send(fe, kit):
        fd = kit.pipe() if fd_kind == "pipe" else kit.memfd()
        fe.send(R.ADD_MEM_REG, one_region(*r), need_reply=True, fds=[fd])
    return send


def _msg(request, payload=b"", fds=0, **kw):
    def send(fe, kit):
        fe.send(request, payload, need_reply=True, fds=[kit.pipe() for _ in range(fds)], **kw)
    return send


def _then(first, second):
    def send(fe, kit):
        first(fe, kit)
        second(fe, kit)
    return send


def _truncated(data):
    def send(fe, kit):
        fe.send_raw(data)
        fe.sock.shutdown(socket.SHUT_WR)
    return send


U64_MAX = (1 << 64) - 1
NINE = tuple(region(size=0x10000, gpa=i * 0x10000, uva=UVA + i * 0x10000) for i in range(9))
EIGHT = NINE[:8]
ADDR_OUTSIDE = VringAddr(0, 0, UVA + MEM_SIZE, UVA + 0x2000, UVA + 0x1000, 0).pack()
ADDR_STRADDLES = VringAddr(0, 0, UVA + MEM_SIZE - 0x800, UVA + 0x2000, UVA + 0x1000, 0).pack()
ADDR_MISALIGNED = VringAddr(0, 0, UVA + 4, UVA + 0x2000, UVA + 0x1000, 0).pack()  # +8: served

# (id, sender, "nack" | "close" | "ok", text the master's log must show)
CASES = [
    # payload size of fixed-size messages
    ("set_features_short", _msg(R.SET_FEATURES, bytes(4)), "nack", "SET_FEATURES refused: payload of 4 bytes is the wrong size"),
    ("set_features_long", _msg(R.SET_FEATURES, bytes(16)), "nack", "SET_FEATURES refused: payload of 16 bytes is the wrong size"),
    ("set_vring_num_short", _msg(R.SET_VRING_NUM, bytes(4)), "nack", "SET_VRING_NUM refused: payload of 4 bytes"),
    ("set_vring_addr_short", _msg(R.SET_VRING_ADDR, bytes(32)), "nack", "SET_VRING_ADDR refused: payload of 32 bytes"),
    ("set_vring_base_empty", _msg(R.SET_VRING_BASE), "nack", "SET_VRING_BASE refused: payload of 0 bytes"),
    ("set_vring_kick_short", _msg(R.SET_VRING_KICK, bytes(4)), "nack", "SET_VRING_KICK refused: payload of 4 bytes"),
    ("set_protocol_features_odd", _msg(R.SET_PROTOCOL_FEATURES, bytes(7)), "nack", "SET_PROTOCOL_FEATURES refused: payload of 7 bytes"),
    ("set_mem_table_ragged", _msg(R.SET_MEM_TABLE, bytes(20), fds=1), "nack", "SET_MEM_TABLE refused: payload of 20 bytes"),
    ("set_owner_with_payload", _msg(R.SET_OWNER, bytes(8)), "nack", "SET_OWNER refused: payload of 8 bytes"),
    # a request that always replies cannot be refused with an ack: its connection goes
    ("get_features_with_payload", _msg(R.GET_FEATURES, bytes(8)), "close", "closing connection: GET_FEATURES: payload of 8 bytes"),
    # header version and flags
    ("version_0", _msg(R.GET_FEATURES, flags=0), "close", "header version 0, expected 1"),
    ("version_2", _msg(R.SET_OWNER, flags=2), "close", "header version 2, expected 1"),
    ("reply_flag_on_request", _msg(R.SET_OWNER, flags=VERSION | FLAG_REPLY), "nack", "reply flag set on a request"),
    ("reserved_flags", _msg(R.SET_OWNER, flags=VERSION | 0x100), "nack", "reserved header flags set (0x109)"),
    # fds where none belong, missing, too many
    ("fd_on_set_owner", _msg(R.SET_OWNER, fds=1), "nack", "SET_OWNER refused: 1 fds attached, expected 0..0"),
    ("fd_on_set_vring_num", _msg(R.SET_VRING_NUM, VringState(0, 256).pack(), fds=1), "nack", "SET_VRING_NUM refused: 1 fds attached"),
    ("two_fds_on_set_vring_call", _msg(R.SET_VRING_CALL, U64(0).pack(), fds=2), "nack", "SET_VRING_CALL refused: 2 fds attached, expected 0..1"),
    ("kick_without_fd_or_flag", _msg(R.SET_VRING_KICK, U64(0).pack()), "nack", "no fd attached and the no-fd flag is not set"),
    ("call_nofd_flag_with_fd", _msg(R.SET_VRING_CALL, U64(0x100).pack(), fds=1), "nack", "no-fd flag set but an fd is attached"),
    ("kick_reserved_bits", _msg(R.SET_VRING_KICK, U64(0x200).pack(), fds=1), "nack", "has reserved bits set"),
    ("mem_table_without_fds", _bad_table(region(), nfds=0), "nack", "SET_MEM_TABLE refused: 0 fds attached"),
    ("mem_table_fewer_fds_than_regions", _bad_table(region(0x10000), region(0x10000, gpa=0x10000, uva=UVA + 0x10000), nfds=1), "nack", "2 regions but 1 fds"),
    ("nine_fds", _bad_table(*EIGHT, nfds=9, size=0x80000), "close", "9 fds with one message (at most 8)"),
    ("twenty_fds", _msg(R.SET_OWNER, fds=20), "close", "too many fds in one message"),
    # ring indices and sizes
    ("ring_index_past_queues", _msg(R.SET_VRING_NUM, VringState(16, 256).pack()), "nack", "ring index 16 out of range (0..15): queue pair 8 asked for, 8 offered (vhu.master --queues); the front-end's set-up is refused"),
    ("ring_index_huge", _msg(R.SET_VRING_BASE, VringState(0xFFFFFFFF, 0).pack()), "nack", "ring index 4294967295 out of range"),
    ("kick_ring_index_255", _msg(R.SET_VRING_KICK, U64(0x1FF).pack()), "nack", "ring index 255 out of range"),
    ("addr_ring_index", _msg(R.SET_VRING_ADDR, VringAddr(17, 0, UVA, UVA + 0x2000, UVA + 0x1000, 0).pack()), "nack", "ring index 17 out of range"),
    ("get_vring_base_bad_index", _msg(R.GET_VRING_BASE, VringState(16, 0).pack()), "close", "closing connection: GET_VRING_BASE: ring index 16 out of range"),
    ("ring_size_0", _msg(R.SET_VRING_NUM, VringState(0, 0).pack()), "nack", "ring size 0 is not a power of two"),
    ("ring_size_not_power_of_two", _msg(R.SET_VRING_NUM, VringState(0, 100).pack()), "nack", "ring size 100 is not a power of two"),
    ("ring_size_65536", _msg(R.SET_VRING_NUM, VringState(1, 65536).pack()), "nack", "ring size 65536 is not a power of two"),
    ("vring_base_reserved_bits", _msg(R.SET_VRING_BASE, VringState(0, 0x10000).pack()), "nack", "base 0x10000 has reserved bits set"),
    ("vring_enable_value", _msg(R.SET_VRING_ENABLE, VringState(0, 2).pack()), "nack", "enable value 2 is not 0 or 1"),
    # ring addresses
    ("vring_addr_without_memory", _msg(R.SET_VRING_ADDR, ADDR_OUTSIDE), "nack", "is not inside one memory region"),
    ("vring_addr_outside_memory", _then(_mem_then, _msg(R.SET_VRING_ADDR, ADDR_OUTSIDE)), "nack", f"descriptor table [{UVA + MEM_SIZE:#x}, +0x1000) is not inside one memory region"),
    ("vring_addr_straddles_end", _then(_mem_then, _msg(R.SET_VRING_ADDR, ADDR_STRADDLES)), "nack", f"descriptor table [{UVA + MEM_SIZE - 0x800:#x}, +0x1000)"),
    ("vring_addr_misaligned", _then(_mem_then, _msg(R.SET_VRING_ADDR, ADDR_MISALIGNED)), "nack", "descriptor table at 0x7f0000000004 is not 8-byte aligned"),
    ("vring_addr_unknown_flag", _then(_mem_then, _msg(R.SET_VRING_ADDR, VringAddr(0, 2, UVA, UVA + 0x2000, UVA + 0x1000, 0).pack())), "nack", "address flags 0x2 not supported"),
    # memory tables
    ("mem_overlap_gpa", _bad_table(region(0x200000), region(0x200000, gpa=0x100000, uva=UVA + (1 << 30))), "nack", "overlap in guest_phys_addr"),
    ("mem_overlap_uva", _bad_table(region(0x200000), region(0x200000, gpa=1 << 30, uva=UVA + 0x1000)), "nack", "overlap in userspace_addr"),
    ("mem_size_0", _bad_table(region(0)), "nack", "region 0: memory_size is 0"),
    ("mem_gpa_wraps", _bad_table(region(gpa=U64_MAX - 0xFFF)), "nack", "guest_phys_addr 0xfffffffffffff000 + size 0x400000 wraps"),
    ("mem_uva_wraps", _bad_table(region(uva=U64_MAX - 0xFFFF)), "nack", "userspace_addr 0xffffffffffff0000 + size 0x400000 wraps"),
    ("mem_offset_wraps", _bad_table(region(off=U64_MAX - 0xFFF)), "nack", "mmap_offset 0xfffffffffffff000 + size 0x400000 wraps"),
    ("mem_offset_past_file", _bad_table(region(0x1000, off=MEM_SIZE)), "nack", "region needs offset 0x400000 + size 0x1000"),
    ("mem_region_larger_than_file", _bad_table(region(2 * MEM_SIZE)), "nack", "region needs offset 0x0 + size 0x800000"),
    ("mem_fd_pipe", _bad_table(region(), fd_kind="pipe"), "nack", "is not a memory file"),
    ("mem_fd_dev_null", _bad_table(region(), fd_kind="devnull"), "nack", "is not a memory file"),
    ("mem_nine_regions", _bad_table(*NINE, nfds=8, size=0x10000), "nack", "SET_MEM_TABLE refused: payload of 296 bytes"),
    ("mem_nregions_field_9", lambda fe, kit: fe.send(R.SET_MEM_TABLE, struct.pack("=II", 9, 0) + mem_table(*EIGHT)[8:], need_reply=True, fds=[kit.memfd(0x10000) for _ in range(8)]), "nack", "memory table with 9 regions (1..8)"),
    ("mem_nregions_field_0", lambda fe, kit: fe.send(R.SET_MEM_TABLE, struct.pack("=II", 0, 0) + mem_table(region())[8:], need_reply=True, fds=[kit.memfd()]), "nack", "memory table with 0 regions"),
    # one region at a time (CONFIGURE_MEM_SLOTS)
    ("add_mem_reg_without_fd", _msg(R.ADD_MEM_REG, one_region(*region())), "nack", "ADD_MEM_REG refused: 0 fds attached, expected 1..1"),
    ("add_mem_reg_overlap", _then(_add_region_first, _add_region(region(0x1000, gpa=MEM_SIZE - 0x1000, uva=UVA + (1 << 30)))), "nack", "regions 0 and 1 overlap in guest_phys_addr"),
    # accepted (QEMU < 8 repeats regions per queue pair), but the repeat's fd is not kept
    ("add_mem_reg_repeated", _then(_add_region_first, _add_region(region())), "ok", None),
    ("add_mem_reg_size_0", _add_region(region(0)), "nack", "region 0: memory_size is 0"),
    ("add_mem_reg_pipe", _add_region(region(), fd_kind="pipe"), "nack", "is not a memory file"),
    ("add_mem_reg_past_file", _add_region(region(2 * MEM_SIZE)), "nack", "region needs offset 0x0 + size 0x800000"),
    ("rem_mem_reg_unknown", _then(_add_region_first, _msg(R.REM_MEM_REG, one_region(*region(gpa=1 << 32)), fds=1)), "nack", "REM_MEM_REG refused: no region gpa 0x100000000"),
    # unknown and not negotiated requests
    ("unknown_request_99", _msg(99), "nack", "request 99 refused: unknown request"),
    ("unknown_request_0", _msg(0, bytes(8)), "nack", "request 0 refused: unknown request"),
    ("feature_not_negotiated", _msg(R.SEND_RARP, bytes(8)), "nack", "protocol feature RARP not negotiated"),
    # framing
    ("payload_over_cap", _msg(R.SET_OWNER, size=1 << 20), "close", "payload size 1048576 over the 4096-byte cap"),
    ("payload_size_u32_max", _msg(R.SET_FEATURES, bytes(8), size=0xFFFFFFFF), "close", "payload size 4294967295 over"),
    ("truncated_header_then_eof", _truncated(HEADER.pack(R.SET_OWNER, VERSION, 0)[:6]), "close", "closed the connection mid-message"),
    ("truncated_payload_then_eof", _truncated(HEADER.pack(R.SET_VRING_ADDR, VERSION, 40) + bytes(20)), "close", "closed the connection mid-message"),
    ("truncated_header_stalls", lambda fe, kit: fe.send_raw(HEADER.pack(R.SET_OWNER, VERSION, 0)[:5]), "close", "message incomplete after 2 s"),
]


@pytest.mark.parametrize("send,expect,reason", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_message(master, traffic, send, expect, reason):
    log_count = master.output().count(reason) if reason else 0
    fe = Frontend(master.sockets[0]).negotiate()
    kit = Kit()
    try:
        send(fe, kit)
        if expect in ("nack", "ok"):
            req, flags, size = HEADER.unpack(fe.recv_exact(HEADER.size))
            assert flags == VERSION | FLAG_REPLY and size == 8, (req, flags, size)
            status = U64.STRUCT.unpack(fe.recv_exact(8))[0]
            assert (status != 0) == (expect == "nack"), f"REPLY_ACK status {status}"
            # the connection stays usable after a refused message
            assert U64.STRUCT.unpack(fe.call(R.GET_FEATURES))[0] & NEGOTIATED == NEGOTIATED
        else:
            assert fe.wait_closed(), "connection left open"
        if reason:
            master.wait_log(reason, count=log_count + 1, timeout=10)
        # Every fd the case sent is closed by the master or its workers once refused.
        pids = process_tree(master.proc.pid)
        leaked = kit.identities() & held_files(pids)
        assert not leaked, f"vhu still holds {len(leaked)} fd(s) the bad message carried"
    finally:
        fe.close()
        kit.close()
    assert master.proc.poll() is None, "master died"
    check_serves_next_frontend(master.sockets[0])
    check_port1_counting(master, traffic)


def test_reply_flood_without_reading(master, traffic):
    """A front-end that asks for replies and never reads them costs only its own
    connection: the master stops reading it once its replies back up, closes it
    after a while, and its event loop never blocks meanwhile (the stats file,
    written by that loop every 0.2 s, keeps being rewritten)."""
    reason = "replies not read for 2 s"
    log_count = master.output().count(reason)
    fe = Frontend(master.sockets[0]).negotiate()
    stop = threading.Event()

    def flood():
        one = HEADER.pack(R.GET_FEATURES, VERSION, 0) * 512
        try:
            while not stop.is_set():
                fe.sock.sendall(one)
        except OSError:
            pass

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    stamps = []
    try:
        deadline = time.monotonic() + 30
        while master.output().count(reason) <= log_count and time.monotonic() < deadline:
            stamps.append(master.stats()["time"])
            time.sleep(0.05)
        assert master.output().count(reason) > log_count, master.output()[-3000:]
    finally:
        stop.set()
        fe.sock.shutdown(socket.SHUT_RDWR)
        t.join(10)
        fe.close()
    written = sorted(set(stamps))
    gaps = [b - a for a, b in zip(written, written[1:])]
    assert len(written) >= 5 and max(gaps) < 1.5, f"event loop stalled: stats gaps {gaps}"
    check_serves_next_frontend(master.sockets[0])
    check_port1_counting(master, traffic)


@pytest.mark.parametrize("hostile,counter", [
    ("head_index", "head_out_of_range"),
    ("buffer_outside", "buffer_unmapped"),
])
def test_hostile_ring_is_reported_and_others_go_on(master, traffic, hostile, counter):
    """A front-end writes a bad chain into its TX ring: that ring is marked broken
    with its reason (stats and log), the master and port 1 go on, port 0 serves
    the next front-end."""
    before = master.port(0)["broken"].get(counter, 0)
    s = VappClient(master.sockets[0], name="vhu-hostile-ring")
    try:
        for _ in range(4):
            s.send_arp()
        assert s.wait_used()
        if hostile == "head_index":
            s.make_available(TX, RING_SIZE + 44)            # a head past the table
        else:
            s.process_used()                                # a buffer outside both regions
            s.set_desc(TX, s.free_head, MEM_SIZE + 0x10000, 70, 0, NO_NEXT)
            s.make_available(TX, s.free_head)
        s.kick(TX)
        deadline = time.monotonic() + 10
        while master.port(0)["broken"].get(counter, 0) <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert master.port(0)["broken"].get(counter, 0) == before + 1
        assert master.port(0)["queues"][0]["broken"].get(counter, 0) == before + 1
        master.wait_log(f"{counter}={before + 1}")
        assert master.port(0)["rx_packets"] >= 4
    finally:
        s.close()
    assert master.proc.poll() is None
    check_serves_next_frontend(master.sockets[0])
    check_port1_counting(master, traffic)


@pytest.mark.peers("testpmd")
def test_port1_counts_exactly_after_all_that(master, traffic):
    """Last of the module's port-0 abuse: testpmd's count of what it sent into
    port 1 equals what vhu counted there."""
    assert traffic is not None, "testpmd did not start"
    sent = traffic.stop()[0]["tx_packets"]
    got = master.wait_stable("rx_packets", port=1)
    assert sent > 10_000
    assert got == sent, f"vhu counted {got}, testpmd sent {sent}"
    assert master.port(1)["rx_bytes"] == 64 * sent
    assert master.port(1)["broken"] == {}
    traffic.close()


# -- 100 connect / use / disconnect cycles ------------------------------------------------


def settled_resources(vhu):
    """resources() once the master has finished with the last front-end: it
    answers a new one only after the previous disconnect (workers reset) is done."""
    fe = Frontend(vhu.sockets[0])
    try:
        fe.call(R.GET_FEATURES)
        return resources(vhu.proc.pid)
    finally:
        fe.close()


def test_no_leak_over_100_sessions(tmp_path):
    """Vapp (one queue pair, two 49 MiB regions) 100 times on a port with two
    workers: both map every memory table, worker 0 runs the rings."""
    with VhuMaster(tmp_path, "--app", "sink", "--workers", 2, "--queues", 2,
                   stats_interval=5) as vhu:
        first = None
        for cycle in range(1, 101):
            s = VappClient(vhu.sockets[0], name=f"vhu-leak-{cycle}")
            try:
                for _ in range(4):
                    s.send_arp()
                assert s.wait_used()
            finally:
                s.close()
            # No waiting for the disconnect: the next front-end connects at once,
            # as a restarted one may, and must be served, not refused.
            if cycle == 1:
                first = settled_resources(vhu)
                assert len(first) >= 3, f"master and two workers: {first}"
        last = settled_resources(vhu)
        assert last == first, f"(fds, memfd mappings) per process after cycle 1 {first}, after 100 {last}"
        vhu.stop()
        assert vhu.port()["rx_packets"] == 100 * 4
        assert "refusing another" not in vhu.output()


# -- life cycle -------------------------------------------------------------------------------


def master_argv(*args):
    return [sys.executable, "-m", "vhu.master", *map(str, args)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_cleanly(tmp_path, sig):
    with VhuMaster(tmp_path, "--workers", 2, "--queues", 2, sockets=("a.sock", "b.sock")) as vhu:
        s = VappClient(vhu.sockets[0])        # a front-end attached with rings running
        try:
            workers = descendants(vhu.proc.pid)
            assert len(workers) >= 2
            vhu.proc.send_signal(sig)
            assert vhu.proc.wait(20) == 0, vhu.output()[-3000:]
            assert s.wait_closed()
        finally:
            s.close()
        for path in vhu.sockets:
            assert not os.path.exists(path), f"{path} left behind"
        assert not wait_gone(workers), "worker processes outlived the master"
        assert "Traceback" not in vhu.output()


def test_killed_master_workers_exit_and_stale_socket_replaced(tmp_path):
    vhu = VhuMaster(tmp_path, "--workers", 2, "--queues", 2)
    with vhu:
        fe = Frontend(vhu.sockets[0])
        fe.call(R.GET_FEATURES)              # the event loop runs: workers are up
        fe.close()
        workers = descendants(vhu.proc.pid)
        assert len(workers) >= 2
        vhu.proc.kill()
        vhu.proc.wait(10)
        assert not wait_gone(workers, 10), "workers did not exit after the master was killed"
        assert os.path.exists(vhu.sockets[0]), "a killed master leaves its socket file"
    with VhuMaster(tmp_path, sockets=(os.path.basename(vhu.sockets[0]),)) as again:
        again.wait_log("removed a stale socket file")
        s = VappClient(again.sockets[0])
        try:
            for _ in range(10):
                s.send_arp()
            assert s.wait_used()
        finally:
            s.close()
        assert again.wait_stable("rx_packets") == 10
        again.stop()


def test_live_socket_refused(tmp_path):
    with VhuMaster(tmp_path) as first:
        path = first.sockets[0]
        inode = os.lstat(path).st_ino
        second = subprocess.run(master_argv("--socket", path), cwd=REPO, capture_output=True,
                                text=True, timeout=60)
        assert second.returncode not in (0, None)
        out = (second.stdout + second.stderr).strip().splitlines()
        errors = [ln for ln in out if "ERROR" in ln or "error" in ln]
        assert len(errors) == 1, out
        assert path in errors[0] and "live back-end" in errors[0]
        assert os.lstat(path).st_ino == inode, "the first master's socket was replaced"
        s = VappClient(path)         # and the first master still serves
        try:
            for _ in range(5):
                s.send_arp()
            assert s.wait_used()
        finally:
            s.close()
        first.stop()


@pytest.mark.parametrize("mode_args,mode", [((), 0o600), (("--socket-mode", "0660"), 0o660)],
                         ids=["default", "0660"])
def test_socket_mode(tmp_path, mode_args, mode):
    with VhuMaster(tmp_path, *mode_args) as vhu:
        st = os.lstat(vhu.sockets[0])
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == mode, oct(st.st_mode)
        vhu.stop()


@pytest.mark.parametrize("args", [
    [],
    ["--socket", "x.sock", "--workers", "0"],
    ["--socket", "x.sock", "--app", "bridge"],
    ["--socket", "x.sock", "--queues", "many"],
    ["--socket", "x.sock", "--socket-mode", "999"],
    ["--socket", "x.sock", "--bogus"],
    ["--socket", "x.sock", "--socket", "x.sock"],
], ids=["no-socket", "workers-0", "bad-app", "queues-nan", "mode-999", "unknown-flag", "same-path"])
def test_bad_arguments(tmp_path, args):
    r = subprocess.run(master_argv(*args), cwd=tmp_path, capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("vhu.master: error:"), r.stderr
    assert r.stdout == ""
    assert not os.path.exists(tmp_path / "x.sock")


def test_next_frontend_served_right_after_a_busy_one(tmp_path):
    """A front-end sends a burst of messages and closes; the next connects at
    once. The master finishes with the first (its EOF included) before it
    decides whether the port is free: the newcomer is served, not refused."""
    with VhuMaster(tmp_path) as vhu:
        for round_ in range(5):
            fe = Frontend(vhu.sockets[0])
            fe.send_raw((HEADER.pack(R.SET_VRING_NUM, VERSION, 8) + VringState(0, 256).pack()) * 200)
            fe.close()
            nxt = Frontend(vhu.sockets[0])
            try:
                assert U64.STRUCT.unpack(nxt.call(R.GET_FEATURES))[0] & NEGOTIATED == NEGOTIATED
            finally:
                nxt.close()
        assert "refusing another" not in vhu.output()
        vhu.stop()
