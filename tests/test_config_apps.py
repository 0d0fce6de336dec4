"""Command-line flags of the apps (switch, pcap, tap, metrics): parsing only."""
import pytest

from vhu.config import UsageError, parse_args


def test_app_flags_parse(tmp_path):
    c = parse_args(["--socket", "a", "--socket", "b", "--socket", "c", "--app", "switch",
                    "--pcap", str(tmp_path), "--snaplen", "128", "--mac-ageing", "30",
                    "--metrics-port", "0"])
    assert (c.app, c.pcap_dir, c.snaplen, c.mac_ageing, c.metrics_port) == \
        ("switch", str(tmp_path), 128, 30.0, 0)
    c = parse_args(["--socket", "a", "--tap", "vhu0", "--app", "patch"])
    assert c.taps == ("vhu0",) and c.sockets == ("a",)
    assert parse_args(["--socket", "a", "--app", "switch"]).app == "switch"     # one port is fine


@pytest.mark.parametrize("argv,message", [
    (["--app", "pcap"], "--app pcap needs --pcap"),
    (["--app", "echo", "--pcap", "."], "--pcap works with"),
    (["--app", "switch", "--pcap", "/nonexistent/dir"], "not a directory"),
    (["--app", "switch", "--snaplen", "10"], "--snaplen"),
    (["--app", "switch", "--mac-ageing", "0"], "--mac-ageing"),
    (["--metrics-port", "70000"], "--metrics-port"),
    (["--tap", "x" * 16], "--tap"),
    (["--tap", "t0", "--tap", "t0", "--app", "switch"], "--tap"),
    (["--tap", "t0", "--tap", "t1", "--app", "patch"], "exactly two ports"),
])
def test_app_flag_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args(["--socket", "a"] + argv)
