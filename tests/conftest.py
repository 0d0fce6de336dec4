"""Shared pytest set-up."""
import os

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def pytest_report_header(config):
    from vhu import _ring
    return f"vhu core: {'debug' if _ring.DEBUG_BUILD else 'release'} build; CI={IN_CI}"


@pytest.fixture
def no_fd_leak():
    """Fails a test that leaves more fds open than it found."""
    before = set(os.listdir("/proc/self/fd"))
    yield
    after = set(os.listdir("/proc/self/fd"))
    leaked = after - before
    assert not leaked, f"fds leaked: {sorted(leaked)}"

@pytest.fixture(autouse=True)
def vhu_gives_back():
    """Every test that runs vhu in this process (a Forwarder) must leave
    behind no worker process, fd or mapping of guest memory it did not find
    (STYLE.md pattern 9; vhu.master subprocesses: tests.vhuproc)."""
    from tests.balance import own_holdings, own_settled
    from vhu import control
    started = []
    real_run = control.ControlLoop.run

    async def counting_run(self, *args, **kwargs):
        started.append(self)
        return await real_run(self, *args, **kwargs)
    before = own_holdings()
    control.ControlLoop.run = counting_run
    try:
        yield
    finally:
        control.ControlLoop.run = real_run
    if started:
        after = own_settled(before)
        names = ("worker processes", "open fds", "shared mappings")
        diff = {n: (b, a) for n, b, a in zip(names, before, after) if a != b}
        assert not diff, f"vhu did not give back what it took (before, after): {diff}"


pytest_plugins = ["tests._peers_plugin"]
