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

pytest_plugins = ["tests._peers_plugin"]
