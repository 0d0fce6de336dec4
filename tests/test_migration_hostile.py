"""A hostile front-end's dirty log, against vhu.master (raw sockets, real rings).

The log is the front-end's memory like its regions: a log fd smaller than
what SET_LOG_BASE claims costs that front-end its connection (it waits for
the reply we cannot give), and a log shrunk under a logging worker (SIGBUS)
is put on that port alone: cut off, the worker replaced, the other port
served.
"""
import os
import time

from tests.rawfront import RingFrontend
from tests.test_master_hostile import NEGOTIATED, PROTOCOL, Frontend
from tests.vhuproc import VhuMaster
from vhu.protocol.messages import (
    LogDescription, ProtocolFeature as PF, Request as R, U64, VRING_F_LOG, VirtioFeature as VF,
    VringAddr,
)

UVA = 0x7F00_0000_0000
LOG_ALL = 1 << VF.LOG_ALL


def log_memfd(size):
    fd = os.memfd_create("vhu-test-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def start_logging(a, log_fd, size):
    """As QEMU at a migration's start, on a's running rings."""
    fe = a.fe
    assert fe.ack(R.SET_PROTOCOL_FEATURES, U64(PROTOCOL | 1 << PF.LOG_SHMFD).pack()) == 0
    fe.send(R.SET_LOG_BASE, LogDescription(size, 0).pack(), fds=[log_fd])
    assert U64.STRUCT.unpack(fe.reply(R.SET_LOG_BASE))[0] == 0
    assert fe.ack(R.SET_FEATURES, U64(NEGOTIATED | LOG_ALL).pack()) == 0
    for i in (0, 1):
        desc, avail, used = a.ring_gpas(i)
        assert fe.ack(R.SET_VRING_ADDR, VringAddr(i, VRING_F_LOG, UVA + desc, UVA + used,
                                                  UVA + avail, used).pack()) == 0


def wait_for(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_log_fd_smaller_than_claimed_costs_the_connection(tmp_path):
    with VhuMaster(tmp_path, "--app", "sink") as vhu:
        fe = Frontend(vhu.sockets[0]).negotiate()
        fd = log_memfd(4096)
        try:
            assert fe.ack(R.SET_PROTOCOL_FEATURES,
                          U64(PROTOCOL | 1 << PF.LOG_SHMFD).pack()) == 0
            fe.send(R.SET_LOG_BASE, LogDescription(8192, 0).pack(), fds=[fd])
            assert fe.wait_closed(10)
            vhu.wait_log("log refused: log: fd is 0x1000 bytes, the log needs offset 0x0 + "
                         "size 0x2000")
        finally:
            fe.close()
            os.close(fd)
        vhu.stop()


def test_log_marked_then_shrunk_under_the_worker_cuts_off_that_port_alone(tmp_path):
    with VhuMaster(tmp_path, "--app", "sink", "--workers", "1",
                   sockets=("a.sock", "b.sock")) as vhu:
        a = RingFrontend(vhu.sockets[0], name="vhu-log-shrink")
        log_fd = log_memfd(4096)
        try:
            start_logging(a, log_fd, 4096)
            a.send([bytes(60)] * 8)
            assert a.wait_used(8) == 8
            used_page = a.ring_gpas(1)[2] // 4096
            log = os.pread(log_fd, 4096, 0)
            assert log[used_page // 8] >> (used_page % 8) & 1, "TX used ring not marked"
            assert wait_for(lambda: vhu.port(0)["log_pages"] > 0 and
                            vhu.port(0)["logging"] == "on")
            before = vhu.stats()["workers"][0]["pid"]
            os.ftruncate(log_fd, 0)          # the worker's next mark faults
            a.send([bytes(60)] * 8)
            assert a.fe.wait_closed(15), "the front-end whose log faulted was not cut off"
            assert wait_for(lambda: vhu.stats()["workers"][0]["pid"] != before)
            vhu.wait_log("in port 0's memory")
        finally:
            a.close()
            os.close(log_fd)
        b = RingFrontend(vhu.sockets[1])
        try:
            b.send([bytes(60)] * 50)
            assert b.wait_used(50) == 50
        finally:
            b.close()
        assert wait_for(lambda: vhu.port(1)["rx_packets"] == 50)
        vhu.stop()
