"""Open vSwitch with DPDK (Debian ``openvswitch-switch-dpdk`` 3.1) as a vhost-user peer.

``Ovs`` runs its own ovsdb-server and ovs-vswitchd-dpdk, in the foreground
as children of this process, in a private run directory (database, control
sockets, logs and the vhost-user sockets of its ports), never the system's
``/var/run/openvswitch``. A netdev (userspace) bridge then carries frames
between DPDK ports::

    with Ovs(pmd_cpu=1) as ovs:
        ovs.add_bridge("br0")
        a = ovs.add_virtio_user_port("br0", "vu0", "/tmp/vhost.sock")  # OVS as front-end
        b = ovs.add_vhost_user_port("br0", "vh0")       # OVS as back-end: it listens on b
        ovs.connect_ports("br0", "vu0", "vh0")          # two flows, no MAC learning
        ...
        ovs.port_stats("br0", "vu0")                    # {"rx_packets": .., "tx_dropped": ..}

Port kinds (``Interface`` types):

* ``dpdk`` with ``dpdk-devargs=net_virtio_user0,path=SOCK``: DPDK's
  virtio-user PMD inside OVS, a vhost-user front-end on SOCK (vhu.master's
  socket); ``server=1`` makes it listen instead.
* ``dpdkvhostuser``: OVS is the back-end and listens on ``RUN_DIR/NAME``
  (deprecated by OVS, still supported in 3.1).
* ``dpdkvhostuserclient``: OVS is the back-end and connects to
  ``options:vhost-server-path`` (a front-end listening there).

What it takes on a small shared host (found by trying):

* ``other_config:dpdk-extra`` always carries ``--no-pci`` (no NIC probing)
  and ``--single-file-segments`` (with one file per 2 MiB page a virtio-user
  port's memory table has more regions than vhost-user allows), and a
  ``--file-prefix`` of its own; OVS adds ``--in-memory`` itself.
* ``dpdk-socket-mem`` and ``dpdk-socket-limit`` both small (256 MiB by
  default: the mbuf pool for a 1500-byte MTU fits), so OVS takes what it
  needs once and never grows into the hugepages testpmd may want.
* No hugepages free (or ``huge=False``): ``--no-huge --legacy-mem -m MB``
  instead of the socket-mem options (``--no-huge`` implies legacy memory,
  which the ``--in-memory`` OVS adds by default refuses unless asked for
  explicitly; then OVS leaves ``--in-memory`` out). 256 MB is too little
  there for the mempool of a vhost-user port, 512 MB works; frames move an
  order of magnitude slower than with hugepages, but they move.
* ``per-port-memory=true``: OVS's shared mempool takes the largest pool
  the heap can hold (halving from 256K mbufs), which leaves too little for
  a second vhost-user port's own allocations at set-up; in about one run in
  three OVS then logs "failed to allocate memory for batching copy" (or
  "... for dev->guest_pages") and drops that front-end's connection.
  Pools sized per port leave room (10 of 10 two-port set-ups).
* ``pmd-cpu-mask`` puts the one PMD thread (it busy-polls all ports) on one
  core; the main thread is pinned with taskset (``main_cpu``).
* ``ovs-ofctl dump-ports`` reads live counters (the Interface table's
  ``statistics`` column is refreshed every 5 s) of DPDK ports such as the
  virtio-user one. Vhost-user ports report none in this build, connected or
  not (``dpctl/show -s``: "could not retrieve stats (Protocol error)"):
  count on the virtio-user port or at the other side.

stop() ends ovs-vswitchd (``ovs-appctl exit``, then signals), then
ovsdb-server, removes the DPDK runtime files of its file prefix and the run
directory: nothing it started outlives it.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Dict, List, Optional, Sequence

from .dpdk import cleanup_prefix, hugepages_usable

log = logging.getLogger(__name__)

VSWITCHD = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk"
SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
TOOLS = ("ovsdb-tool", "ovsdb-server", "ovs-vsctl", "ovs-ofctl", "ovs-appctl")

_counter = itertools.count()
_V = r"([^,\s]+)"
_PORT_LINE = re.compile(
    rf"port\s+([^:\s]+):\s+rx pkts={_V}, bytes={_V}, drop={_V}, errs={_V}.*?\n"
    rf"\s+tx pkts={_V}, bytes={_V}, drop={_V}, errs={_V}")


class OvsError(RuntimeError):
    """OVS failed to start, died, or refused a command."""


def find_vswitchd() -> Optional[str]:
    """The DPDK build of ovs-vswitchd (``$VHU_OVS_VSWITCHD`` overrides), or None."""
    path = os.environ.get("VHU_OVS_VSWITCHD", VSWITCHD)
    return path if os.access(path, os.X_OK) else None


def ovs_missing_reason() -> Optional[str]:
    """None if OVS-DPDK looks usable here, else why not (for pytest.skip)."""
    if find_vswitchd() is None:
        return f"{VSWITCHD} not found (run scripts/setup-peers.sh: openvswitch-switch-dpdk)"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} not found (openvswitch-switch)"
    if not os.path.exists(SCHEMA):
        return f"{SCHEMA} not found (openvswitch-common)"
    if os.geteuid() != 0:
        return "OVS-DPDK needs root (hugepages, DPDK memory)"
    return None


def parse_dump_ports(text: str) -> Dict[str, Dict[str, Optional[int]]]:
    """``ovs-ofctl dump-ports`` -> {ofport: {rx_packets, rx_bytes, rx_dropped,
    rx_errors, tx_packets, tx_bytes, tx_dropped, tx_errors}}; a counter the
    port does not report ("?") is None."""
    keys = ("rx_packets", "rx_bytes", "rx_dropped", "rx_errors",
            "tx_packets", "tx_bytes", "tx_dropped", "tx_errors")
    return {m.group(1): {k: None if v == "?" else int(v) for k, v in zip(keys, m.groups()[1:])}
            for m in _PORT_LINE.finditer(text)}


class Ovs:
    """ovsdb-server + ovs-vswitchd-dpdk in a private run directory (module docstring).

    pmd_cpu: the core of the one PMD thread (``pmd-cpu-mask``); main_cpu:
    where the main threads run (taskset; None: anywhere). socket_mem_mb:
    DPDK memory (``dpdk-socket-mem`` = ``dpdk-socket-limit``, or ``-m`` with
    no hugepages; default 256 and 512). huge: True hugepages, False ``--no-huge``, None: hugepages
    if some are free. run_dir: where everything goes (default: a fresh
    /tmp/vhu-ovs-* directory, removed by stop()).
    """

    def __init__(self, *, pmd_cpu: int = 1, main_cpu: Optional[int] = None,
                 socket_mem_mb: Optional[int] = None, huge: Optional[bool] = None,
                 run_dir: Optional[str] = None, other_config: Optional[Dict[str, str]] = None,
                 startup_timeout: float = 60.0) -> None:
        self.pmd_cpu, self.main_cpu = pmd_cpu, main_cpu
        self.huge = hugepages_usable() if huge is None else huge
        self.socket_mem_mb = socket_mem_mb or (256 if self.huge else 512)
        self._own_dir = run_dir is None
        self.run_dir = run_dir or tempfile.mkdtemp(prefix="vhu-ovs-")
        self.file_prefix = f"vhuovs{os.getpid()}_{next(_counter)}"
        self.other_config = dict(other_config or {})
        self.startup_timeout = startup_timeout
        self.db_sock = os.path.join(self.run_dir, "db.sock")
        self.db_ctl = os.path.join(self.run_dir, "ovsdb-server.ctl")
        self.vswitchd_ctl = os.path.join(self.run_dir, "ovs-vswitchd.ctl")
        self.vswitchd_log = os.path.join(self.run_dir, "ovs-vswitchd.log")
        self.ovsdb: Optional[subprocess.Popen] = None
        self.vswitchd: Optional[subprocess.Popen] = None
        self.bridges: List[str] = []
        self._env = dict(os.environ, OVS_RUNDIR=self.run_dir, OVS_DBDIR=self.run_dir,
                         OVS_LOGDIR=self.run_dir, OVS_SYSCONFDIR=self.run_dir)

    # ------------------------------------------------------------------ commands

    def _run(self, argv: Sequence[str], timeout: float = 30.0, check: bool = True) -> str:
        try:
            r = subprocess.run(list(argv), env=self._env, capture_output=True, text=True,
                               timeout=timeout, cwd=self.run_dir)
        except subprocess.TimeoutExpired as exc:
            raise OvsError(f"{' '.join(argv)}: no answer in {timeout:g} s\n{self._diag()}") from exc
        if check and r.returncode != 0:
            raise OvsError(f"{' '.join(argv)} failed ({r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()}\n{self._diag()}")
        return r.stdout

    def vsctl(self, *args: str, timeout: float = 30.0) -> str:
        """ovs-vsctl on this database; it waits for ovs-vswitchd to apply a change."""
        return self._run(["ovs-vsctl", f"--db=unix:{self.db_sock}", f"--timeout={int(timeout)}",
                          *args], timeout + 5)

    def ofctl(self, *args: str, timeout: float = 30.0) -> str:
        return self._run(["ovs-ofctl", *args], timeout)

    def appctl(self, *args: str, timeout: float = 30.0) -> str:
        return self._run(["ovs-appctl", "-t", self.vswitchd_ctl, *args], timeout)

    def log_text(self) -> str:
        try:
            with open(self.vswitchd_log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _diag(self) -> str:
        tail = "\n".join(self.log_text().splitlines()[-20:])
        rc = self.vswitchd.poll() if self.vswitchd else None
        return f"[ovs-vswitchd rc={rc}] log tail:\n{tail}"

    # ------------------------------------------------------------------ lifecycle

    def _dpdk_config(self) -> Dict[str, str]:
        extra = ["--no-pci", "--single-file-segments", f"--file-prefix={self.file_prefix}"]
        cfg = {"dpdk-init": "true", "pmd-cpu-mask": hex(1 << self.pmd_cpu),
               "per-port-memory": "true"}
        if self.huge:
            cfg["dpdk-socket-mem"] = cfg["dpdk-socket-limit"] = str(self.socket_mem_mb)
        else:
            extra += ["--no-huge", "--legacy-mem", "-m", str(self.socket_mem_mb)]
        cfg["dpdk-extra"] = " ".join(extra)
        cfg.update(self.other_config)
        return cfg

    def _spawn(self, argv: List[str]) -> subprocess.Popen:
        if self.main_cpu is not None:
            argv = ["taskset", "-c", str(self.main_cpu)] + argv
        log.info("starting %s", " ".join(argv))
        return subprocess.Popen(argv, env=self._env, cwd=self.run_dir, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)

    def _wait_for(self, path: str, proc: subprocess.Popen, what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while not os.path.exists(path):
            if proc.poll() is not None:
                raise OvsError(f"{what} exited ({proc.returncode}) at start\n{self._diag()}")
            if time.monotonic() > deadline:
                raise OvsError(f"{what} did not create {path} in {self.startup_timeout:g} s")
            time.sleep(0.05)

    def start(self) -> "Ovs":
        """Create the database, start ovsdb-server and ovs-vswitchd-dpdk, wait for DPDK."""
        if self.ovsdb is not None:
            raise OvsError("already started")
        vswitchd = find_vswitchd()
        if vswitchd is None:
            raise OvsError(ovs_missing_reason() or "ovs-vswitchd-dpdk not found")
        cleanup_prefix(self.file_prefix)
        try:
            db = os.path.join(self.run_dir, "conf.db")
            self._run(["ovsdb-tool", "create", db, SCHEMA])
            self.ovsdb = self._spawn([
                "ovsdb-server", db, f"--remote=punix:{self.db_sock}",
                f"--unixctl={self.db_ctl}",
                f"--log-file={os.path.join(self.run_dir, 'ovsdb-server.log')}"])
            self._wait_for(self.db_sock, self.ovsdb, "ovsdb-server")
            self.vsctl("--no-wait", "init")
            self.vsctl("--no-wait", "set", "Open_vSwitch", ".",
                       *(f"other_config:{k}={v}" for k, v in self._dpdk_config().items()))
            self.vswitchd = self._spawn([vswitchd, f"unix:{self.db_sock}",
                                         f"--unixctl={self.vswitchd_ctl}",
                                         f"--log-file={self.vswitchd_log}"])
            self._wait_for(self.vswitchd_ctl, self.vswitchd, "ovs-vswitchd-dpdk")
            deadline = time.monotonic() + self.startup_timeout
            while self.vsctl("get", "Open_vSwitch", ".", "dpdk_initialized").strip() != "true":
                if self.vswitchd.poll() is not None or time.monotonic() > deadline:
                    raise OvsError(f"DPDK did not initialise in ovs-vswitchd\n{self._diag()}")
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> "Ovs":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @staticmethod
    def _end(proc: Optional[subprocess.Popen], timeout: float) -> None:
        if proc is None:
            return
        for sig, wait in ((None, timeout), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if sig is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def stop(self) -> None:
        """ovs-vswitchd (exit: closes its DPDK ports and vhost-user sockets), then
        ovsdb-server; then DPDK's runtime files and the run directory. Idempotent."""
        if self.vswitchd is not None and self.vswitchd.poll() is None:
            try:
                self._run(["ovs-appctl", "-t", self.vswitchd_ctl, "exit"], 20, check=False)
            except OvsError:
                pass
        self._end(self.vswitchd, 20.0)
        if self.ovsdb is not None and self.ovsdb.poll() is None:
            try:
                self._run(["ovs-appctl", "-t", self.db_ctl, "exit"], 10, check=False)
            except OvsError:
                pass
        self._end(self.ovsdb, 10.0)
        self.vswitchd = self.ovsdb = None
        self.bridges = []
        cleanup_prefix(self.file_prefix)
        if self._own_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def alive(self) -> bool:
        return self.vswitchd is not None and self.vswitchd.poll() is None

    # ------------------------------------------------------------------ bridges and ports

    def add_bridge(self, name: str = "br0") -> str:
        """A userspace (netdev) bridge, with no flows until connect_ports/set_flows."""
        self.vsctl("add-br", name, "--", "set", "bridge", name, "datapath_type=netdev")
        self.ofctl("del-flows", name)
        self.bridges.append(name)
        return name

    def _add_port(self, bridge: str, name: str, settings: Sequence[str],
                  ofport: Optional[int]) -> int:
        settings = list(settings) + ([f"ofport_request={ofport}"] if ofport else [])
        self.vsctl("add-port", bridge, name, "--", "set", "Interface", name, *settings)
        ofport = int(self.vsctl("get", "Interface", name, "ofport").strip())
        if ofport < 0:
            err = self.vsctl("get", "Interface", name, "error").strip()
            raise OvsError(f"port {name} was not added: {err}\n{self._diag()}")
        return ofport

    def add_virtio_user_port(self, bridge: str, name: str, socket_path: str, *, index: int = 0,
                             queues: int = 1, server: bool = False,
                             ofport: Optional[int] = None) -> int:
        """OVS as a vhost-user front-end on socket_path (DPDK virtio-user in OVS,
        net_virtio_user<index>, unique among the ports that exist); server=True:
        it listens there. Returns the OpenFlow port number (ofport: ask for it;
        a flow can name it before the port exists)."""
        devargs = f"net_virtio_user{index},path={socket_path},queues={queues}"
        if server:
            devargs += ",server=1"
        settings = ["type=dpdk", f"options:dpdk-devargs={devargs}"]
        if queues > 1:
            settings.append(f"options:n_rxq={queues}")
        return self._add_port(bridge, name, settings, ofport)

    def add_vhost_user_port(self, bridge: str, name: str, *, ofport: Optional[int] = None) -> str:
        """OVS as a vhost-user back-end listening (dpdkvhostuser); the socket path."""
        self._add_port(bridge, name, ["type=dpdkvhostuser"], ofport)
        return os.path.join(self.run_dir, name)

    def add_vhost_user_client_port(self, bridge: str, name: str, socket_path: str, *,
                                   ofport: Optional[int] = None) -> int:
        """OVS as a vhost-user back-end that connects to a listening front-end
        (dpdkvhostuserclient, reconnecting until one listens), at once: give its
        flows first (ofport) or its first frames meet an empty table. Returns the ofport."""
        return self._add_port(bridge, name, ["type=dpdkvhostuserclient",
                                             f"options:vhost-server-path={socket_path}"], ofport)

    def del_port(self, bridge: str, name: str) -> None:
        self.vsctl("--if-exists", "del-port", bridge, name)

    def del_bridge(self, name: str) -> None:
        """The bridge and its ports go (virtio-user ports disconnect, vhost-user
        sockets are removed)."""
        self.vsctl("--if-exists", "del-br", name)
        if name in self.bridges:
            self.bridges.remove(name)

    def ofport(self, name: str) -> int:
        return int(self.vsctl("get", "Interface", name, "ofport").strip())

    def set_flows(self, bridge: str, flows: Sequence[str]) -> None:
        """Replace the bridge's OpenFlow table with these flows."""
        self.ofctl("del-flows", bridge)
        for flow in flows:
            self.ofctl("add-flow", bridge, flow)

    def connect_ports(self, bridge: str, a, b) -> None:
        """Everything from a goes to b and back: two flows, no learning, no
        flooding. a, b: port names, or OpenFlow port numbers (ports to come)."""
        pa, pb = (p if isinstance(p, int) else self.ofport(p) for p in (a, b))
        self.set_flows(bridge, [f"in_port={pa},actions=output:{pb}",
                                f"in_port={pb},actions=output:{pa}"])

    def link_state(self, name: str) -> str:
        return self.vsctl("get", "Interface", name, "link_state").strip().strip('"')

    def wait_link_up(self, name: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.link_state(name) != "up":
            if not self.alive() or time.monotonic() > deadline:
                raise OvsError(f"port {name} link not up in {timeout:g} s "
                               f"({self.vsctl('get', 'Interface', name, 'status').strip()})\n"
                               f"{self._diag()}")
            time.sleep(0.1)

    def port_stats(self, bridge: str, name: str) -> Dict[str, Optional[int]]:
        """Live counters of one port (ovs-ofctl dump-ports): rx_packets, rx_bytes,
        rx_dropped, rx_errors, tx_packets, tx_bytes, tx_dropped, tx_errors;
        None where the port reports nothing (vhost-user ports, module docstring)."""
        ofport = str(self.ofport(name))
        ports = parse_dump_ports(self.ofctl("dump-ports", bridge, ofport))
        if ofport not in ports:
            raise OvsError(f"no counters for port {name} ({ofport})")
        return ports[ofport]
