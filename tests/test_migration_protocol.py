"""Live migration, protocol side (vhost-user "Migration"): VHOST_F_LOG_ALL and
LOG_SHMFD offered, SET_LOG_BASE mapped as a region is checked and always
answered, SET_LOG_FD kept, LOG_ALL and VHOST_VRING_F_LOG switched on running
rings as QEMU's vhost_dev_set_log does, and the fds all given back.
"""
import os

import pytest

from tests.test_protocol import (  # noqa: F401  (no_fd_leak: autouse fixture)
    Peer, Recorder, ack, efd, is_closed, memfd, no_fd_leak, setup_ring, table, u64,
)
from vhu import regions
from vhu.protocol.backend import SUPPORTED_FEATURES, SUPPORTED_PROTOCOL_FEATURES
from vhu.protocol.messages import (
    LogDescription, ProtocolFeature as PF, Request as R, U64, VRING_F_LOG, VirtioFeature as VF,
    VringAddr,
)
from vhu.protocol.wire import pack_reply

LOG_ALL = 1 << VF.LOG_ALL
SPLIT = SUPPORTED_FEATURES & ~(1 << VF.RING_PACKED) & ~LOG_ALL


class LogRecorder(Recorder):
    def __init__(self):
        super().__init__()
        self.refuse_log = None

    def log_changed(self, log):
        os.fstat(log.fd)
        if self.refuse_log:
            raise ValueError(self.refuse_log)
        self.calls.append(("log", log.size, log.offset))

    def check_eventfd(self, fd):
        # As vhu.ports does: anything but an eventfd is refused.
        if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventfd]":
            raise ValueError("fd is not an eventfd")


@pytest.fixture
def mig():
    p = Peer()
    p.hooks = p.dev.hooks = LogRecorder()
    p.negotiate(features=SPLIT)
    p.send(R.SET_MEM_TABLE, table((0, 0x1000000, 0x10000000, 0)), [memfd()])
    yield p
    p.close()
    assert not p.dev.owned_fds()


def log_base(size, offset=0):
    return LogDescription(size, offset).pack()


def test_log_all_and_log_shmfd_are_offered():
    assert SUPPORTED_FEATURES & LOG_ALL
    assert SUPPORTED_PROTOCOL_FEATURES & (1 << PF.LOG_SHMFD)
    p = Peer()
    assert U64.unpack(p.send(R.GET_FEATURES)[12:]).value & LOG_ALL
    assert U64.unpack(p.send(R.GET_PROTOCOL_FEATURES)[12:]).value & (1 << PF.LOG_SHMFD)
    p.close()


def test_set_log_base_is_always_answered_with_zero(mig):
    """QEMU waits for this reply whether or not REPLY_ACK is on (and asks no ack)."""
    fd = memfd(0x2000)
    assert mig.send(R.SET_LOG_BASE, log_base(0x1000, 0x1000), [fd]) == \
        pack_reply(R.SET_LOG_BASE, u64(0))
    assert mig.dev.log == (fd, 0x1000, 0x1000) and not is_closed(fd)
    assert mig.hooks.of("log") == [("log", 0x1000, 0x1000)]
    # A new log replaces the old one, whose fd is closed.
    fd2 = memfd(0x1000)
    assert mig.send(R.SET_LOG_BASE, log_base(0x800), [fd2], need_reply=True) == \
        pack_reply(R.SET_LOG_BASE, u64(0))
    assert is_closed(fd) and mig.dev.log.fd == fd2


@pytest.mark.parametrize("size,offset,why", [
    (0, 0, "mmap_size is 0"),
    (0x1000, 0xfffffffffffff800, "wraps"),
])
def test_bad_log_descriptions_cost_the_connection(mig, size, offset, why):
    """A refused SET_LOG_BASE cannot be answered 0, and QEMU would wait for
    an answer forever: the connection is closed (and the fd with it)."""
    fd = memfd()
    out = mig.raw(R.SET_LOG_BASE, log_base(size, offset), [fd])
    assert out.close and why in out.close
    assert is_closed(fd) and mig.dev.log is None


def test_log_base_without_fd_or_refused_by_the_io_side(mig):
    assert "without its log fd" in mig.raw(R.SET_LOG_BASE, log_base(0x1000)).close
    mig2 = Peer()
    mig2.hooks = mig2.dev.hooks = LogRecorder()
    mig2.negotiate(features=SPLIT)
    mig2.hooks.refuse_log = "fd is 0x1000 bytes"
    fd = memfd()
    out = mig2.raw(R.SET_LOG_BASE, log_base(0x2000), [fd])
    assert out.close and "fd is 0x1000 bytes" in out.close
    assert is_closed(fd)
    mig2.close()


def test_log_needs_log_shmfd_negotiated():
    p = Peer()
    p.negotiate(protocol=SUPPORTED_PROTOCOL_FEATURES & ~(1 << PF.LOG_SHMFD), features=SPLIT)
    fd = memfd()
    out = p.raw(R.SET_LOG_BASE, log_base(0x1000), [fd])
    assert out.close and "LOG_SHMFD" in out.close and is_closed(fd)
    p.close()


def test_region_rule_for_the_log():
    regions.check_log_area(0x1000, 0x1000, 0x2000)
    for args in ((0, 0, 0x1000), (0x1000, 1, 0x1000), (1 << 64, 0, None),
                 (0x1000, (1 << 64) - 0x800, None), (-1, 0, None)):
        with pytest.raises(regions.RegionTableError):
            regions.check_log_area(*args)


def test_set_log_fd_keeps_an_eventfd_only(mig):
    fd = efd()
    assert mig.send(R.SET_LOG_FD, b"", [fd], need_reply=True) == ack(R.SET_LOG_FD)
    assert mig.dev.log_call_fd == fd
    bad = memfd()
    assert mig.send(R.SET_LOG_FD, b"", [bad], need_reply=True) == ack(R.SET_LOG_FD, 1)
    assert is_closed(bad) and mig.dev.log_call_fd == fd
    fd2 = efd()
    mig.send(R.SET_LOG_FD, b"", [fd2])
    assert is_closed(fd) and mig.dev.log_call_fd == fd2


def test_log_all_flips_on_running_rings_other_features_do_not(mig):
    """QEMU's vhost_dev_set_log: SET_LOG_BASE, SET_FEATURES | LOG_ALL, then
    SET_VRING_ADDR with VHOST_VRING_F_LOG per ring, all on running rings;
    the reverse when the migration ends or fails."""
    for i in (0, 1):
        setup_ring(mig, i)
    assert mig.ring(0).started and not mig.ring(0).log_all
    mig.send(R.SET_LOG_BASE, log_base(0x1000), [memfd()])
    assert mig.send(R.SET_FEATURES, u64(SPLIT | LOG_ALL), need_reply=True) == \
        ack(R.SET_FEATURES)
    assert mig.ring(0).log_all and mig.ring(1).log_all and mig.ring(0).started
    for i in (0, 1):
        desc = 0x10000000 + 0x10000 * i
        addr = VringAddr(i, VRING_F_LOG, desc, desc + 0x2000, desc + 0x1000, 0x4000 + i * 0x1000)
        assert mig.send(R.SET_VRING_ADDR, addr.pack(), need_reply=True) == ack(R.SET_VRING_ADDR)
    assert mig.ring(1).log_used and mig.ring(1).log_addr == 0x5000 and mig.ring(1).started
    # The hooks heard each change (the I/O side switches logging in place).
    last = mig.hooks.of("ring", 1)[-1][2]
    assert last.log_all and last.log_used and last.log_addr == 0x5000
    # Any other feature change on running rings is still refused.
    assert mig.send(R.SET_FEATURES, u64(SPLIT & ~(1 << VF.EVENT_IDX) | LOG_ALL),
                    need_reply=True) == ack(R.SET_FEATURES, 1)
    assert mig.dev.acked_features == SPLIT | LOG_ALL
    # Logging off again (the migration failed or was cancelled).
    assert mig.send(R.SET_FEATURES, u64(SPLIT), need_reply=True) == ack(R.SET_FEATURES)
    assert not mig.ring(0).log_all and mig.ring(0).started


def test_vring_addr_flags_other_than_log_are_refused(mig):
    from tests.test_protocol import state
    mig.send(R.SET_VRING_NUM, state(0, 256))
    payload = VringAddr(0, 2, 0x10000000, 0x10002000, 0x10001000, 0).pack()
    assert mig.send(R.SET_VRING_ADDR, payload, need_reply=True) == ack(R.SET_VRING_ADDR, 1)
    payload = VringAddr(0, VRING_F_LOG, 0x10000000, 0x10002000, 0x10001000, 0x2000).pack()
    assert mig.send(R.SET_VRING_ADDR, payload, need_reply=True) == ack(R.SET_VRING_ADDR)


def test_reset_owner_and_close_give_the_log_fds_back(mig):
    log_fd, call_fd = memfd(), efd()
    mig.send(R.SET_LOG_BASE, log_base(0x1000), [log_fd])
    mig.send(R.SET_LOG_FD, b"", [call_fd])
    mig.send(R.RESET_OWNER)
    assert is_closed(log_fd) and is_closed(call_fd) and mig.dev.log is None
