"""VXLAN ports without a network: the spec (--vxlan, VxlanPort, the control
socket's and vhu.ctl's requests), the header as the engine accepts it, the
MTU arithmetic and the counter and stats names. The real peers (the kernel's
vxlan, a second vhu, hostile datagrams) are in tests/test_vxlan_kernel.py."""
import struct

import pytest

from vhu import ctl, vxlan
from vhu._ring import COUNTER_NAMES
from vhu.config import UsageError, parse_args
from vhu.controlsock import RequestError, spec_from
from vhu.portspecs import VxlanPort
from vhu.stats import DROP_REASONS, port_stats
from vhu.workers.forwarder import Forwarder


def test_spec_parses_and_round_trips():
    s = vxlan.parse_spec("vni=42,local=10.16.0.1,remote=10.16.0.2,remote=10.16.0.3,port=4790")
    assert s == VxlanPort(vni=42, local="10.16.0.1", remotes=["10.16.0.2", "10.16.0.3"],
                          port=4790)
    assert s.remotes == ("10.16.0.2", "10.16.0.3") and s.port == 4790
    assert vxlan.parse_spec(s.spec()) == s
    assert s.name == "vxlan:42@10.16.0.1:4790"
    assert vxlan.parse_spec("vni=7,local=10.0.0.1,remote=10.0.0.2").port == 4789
    assert hash(s) == hash(vxlan.parse_spec(s.spec()))


@pytest.mark.parametrize("text, why", [
    ("vni=42,local=10.0.0.1", "remote= is missing"),
    ("local=10.0.0.1,remote=10.0.0.2", "vni= is missing"),
    ("vni=42,remote=10.0.0.2", "local= is missing"),
    ("vni=16777216,local=10.0.0.1,remote=10.0.0.2", "24 bits"),
    ("vni=-1,local=10.0.0.1,remote=10.0.0.2", "24 bits"),
    ("vni=x,local=10.0.0.1,remote=10.0.0.2", "not a number"),
    ("vni=1,local=10.0.0.1,remote=10.0.0.300", "not an IPv4 address"),
    ("vni=1,local=::1,remote=10.0.0.2", "not an IPv4 address"),
    ("vni=1,local=10.0.0.1,remote=239.1.1.1", "not a unicast address"),
    ("vni=1,local=0.0.0.0,remote=10.0.0.2", "not a unicast address"),
    ("vni=1,local=10.0.0.1,remote=10.0.0.2,remote=10.0.0.2", "the same remote twice"),
    ("vni=1,local=10.0.0.1,remote=10.0.0.1", "is the local address"),
    ("vni=1,local=10.0.0.1,remote=10.0.0.2,port=0", "outside 1..65535"),
    ("vni=1,local=10.0.0.1,remote=10.0.0.2,port=70000", "outside 1..65535"),
    ("vni=1,vni=2,local=10.0.0.1,remote=10.0.0.2", "vni given twice"),
    ("vni=1,local=10.0.0.1,remote=10.0.0.2,ttl=3", "unknown key 'ttl'"),
    ("vni=1,local=10.0.0.1,remote", "not key=value"),
    ("vni=1,local=10.0.0.1," + ",".join(f"remote=10.1.0.{i}" for i in range(1, 34)),
     "at most 32 remotes"),
])
def test_bad_specs_say_why(text, why):
    with pytest.raises(vxlan.VxlanError, match=why):
        vxlan.parse_spec(text)


def test_header_is_rfc7348():
    h = vxlan.header(0x123456)
    assert h == bytes([0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0])
    frame = bytes(range(14))
    assert vxlan.parse_header(h + frame) == 0x123456
    assert vxlan.parse_header(h + frame, vni=0x123456) == 0x123456


@pytest.mark.parametrize("data, why", [
    (vxlan.header(42) + bytes(13), "shorter than"),                        # runt inner frame
    (vxlan.header(42)[:7], "shorter than"),                                # truncated header
    (struct.pack("!II", 0, 42 << 8) + bytes(14), "flags word"),            # no I flag
    (struct.pack("!II", 0x0C000000, 42 << 8) + bytes(14), "flags word"),   # a reserved flag too
    (struct.pack("!II", 0x08000001, 42 << 8) + bytes(14), "flags word"),   # reserved bits
    (struct.pack("!II", 0x08000000, (42 << 8) | 1) + bytes(14), "reserved byte"),
    (vxlan.header(43) + bytes(14), "vni 43, not 42"),
])
def test_hostile_headers_are_refused(data, why):
    with pytest.raises(vxlan.VxlanError, match=why):
        vxlan.parse_header(data, vni=42)


def test_mtu_arithmetic():
    # A 1500-byte underlay: inner frames up to 1464 bytes, guest MTU 1450.
    assert vxlan.max_inner_frame(1500) == 1464
    assert 1500 - vxlan.GUEST_MTU_OVERHEAD == 1450
    assert vxlan.max_inner_frame(9000) == 8964
    assert vxlan.max_inner_frame(70000) == 65535
    with pytest.raises(vxlan.VxlanError):
        vxlan.max_inner_frame(40)


def test_source_port_is_the_kernels_mapping():
    lo, hi = vxlan.DEFAULT_SOURCE_PORTS
    assert vxlan.source_port(0) == lo
    assert vxlan.source_port(0xFFFFFFFF) == hi - 1
    assert all(lo <= vxlan.source_port(h) < hi for h in range(0, 1 << 32, 99991 * 997))
    got = vxlan.local_port_range()
    assert got[0] < got[1]


def test_counters_and_drop_reasons_are_appended():
    n = len(COUNTER_NAMES)
    i = COUNTER_NAMES.index("vxlan_bad")          # appended: after every older counter
    assert i > COUNTER_NAMES.index("broken_kick_fd_error")
    assert COUNTER_NAMES[i:i + 3] == ["vxlan_bad", "vxlan_foreign", "vxlan_too_big"]
    for reason in ("vxlan_bad", "vxlan_foreign", "vxlan_too_big"):
        assert DROP_REASONS[reason] == (reason,)
    import numpy as np
    snap = np.zeros((1, 2, n), dtype=np.uint64)
    snap[0, 1, COUNTER_NAMES.index("vxlan_bad")] = 3
    snap[0, 1, COUNTER_NAMES.index("vxlan_foreign")] = 2
    snap[0, 0, COUNTER_NAMES.index("vxlan_too_big")] = 1
    ps = port_stats(snap, 0, 1, "vxlan:42@10.0.0.1:4789", True)
    assert ps["drops_by_reason"]["vxlan_bad"] == 3
    assert ps["drops_by_reason"]["vxlan_foreign"] == 2
    assert ps["drops_by_reason"]["vxlan_too_big"] == 1
    assert ps["drops"] == 6


def test_cli_numbers_vxlan_ports_last():
    c = parse_args(["--socket", "/tmp/a.sock", "--tap", "t0", "--app", "switch",
                    "--vxlan", "vni=42,local=10.0.0.1,remote=10.0.0.2",
                    "--vxlan", "vni=43,local=10.0.0.1,remote=10.0.0.3,port=4790"])
    assert [v.vni for v in c.vxlans] == [42, 43]
    # Several VNIs on one local address and UDP port share its socket.
    shared = parse_args(["--socket", "/tmp/a.sock",
                         "--vxlan", "vni=42,local=10.0.0.1,remote=10.0.0.2",
                         "--vxlan", "vni=43,local=10.0.0.1,remote=10.0.0.2"])
    assert [(v.vni, v.port) for v in shared.vxlans] == [(42, 4789), (43, 4789)]
    from vhu.control import initial_specs
    kinds = [type(s).__name__ for s in initial_specs(c)]
    assert kinds == ["VhostUserPort", "TapDevice", "VxlanPort", "VxlanPort"]


@pytest.mark.parametrize("argv, why", [
    (["--vxlan", "vni=42,local=10.0.0.1"], "remote= is missing"),
    (["--vxlan", "vni=42,local=10.0.0.1,remote=10.0.0.2",
      "--vxlan", "vni=42,local=10.0.0.1,remote=10.0.0.3"], "vni 42 on 10.0.0.1:4789 twice"),
    (["--app", "patch", "--vxlan", "vni=1,local=10.0.0.1,remote=10.0.0.2",
      "--tap", "t0"], "exactly two ports"),
])
def test_cli_refuses(argv, why):
    with pytest.raises(UsageError, match=why):
        parse_args(["--socket", "/tmp/a.sock", *argv])


def test_forwarder_takes_vxlan_ports_last():
    v = VxlanPort(vni=42, local="10.0.0.1", remotes=["10.0.0.2"])
    fw = Forwarder(["/tmp/a.sock", v], pipeline=["patch"])
    assert fw.config.vxlans == (v,)
    with pytest.raises(ValueError, match="VXLAN ports last"):
        Forwarder([v, "/tmp/a.sock"], pipeline=["patch"])


def test_control_requests():
    spec = spec_from({"cmd": "add-port", "vxlan": "vni=42,local=10.0.0.1,remote=10.0.0.2"})
    assert spec == VxlanPort(42, "10.0.0.1", ["10.0.0.2"])
    with pytest.raises(RequestError, match="vxlan: remote= is missing"):
        spec_from({"cmd": "add-port", "vxlan": "vni=42,local=10.0.0.1"})
    with pytest.raises(RequestError, match="one of socket, tap or vxlan"):
        spec_from({"cmd": "add-port", "vxlan": "vni=1,local=10.0.0.1,remote=10.0.0.2",
                   "tap": "t0"})
    a = ctl.build_parser().parse_args(["--control", "x", "add-port", "--vxlan",
                                       "vni=42,local=10.0.0.1,remote=10.0.0.2"])
    assert ctl.request_of(a) == {"cmd": "add-port",
                                 "vxlan": "vni=42,local=10.0.0.1,remote=10.0.0.2"}
