"""pytest plugin for the real-peer test bed (wire it in via conftest.py:
``pytest_plugins = ["tests._peers_plugin"]`` or import its hooks).

Registers the ``peers`` marker: tests that need DPDK testpmd and/or QEMU,
installed by ``scripts/setup-peers.sh``.  Deselect them with ``-m "not peers"``.
"""


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "peers: needs a real vhost-user peer (DPDK testpmd or QEMU), "
        "installed by scripts/setup-peers.sh; missing peers skip, or fail when CI=true",
    )
