"""What is decided on is what is delivered (STYLE.md pattern 14).

A guest can rewrite its buffers while vhu looks at them. Here a second
thread of the "guest" flips, as fast as it can, the byte a decision depends
on, while frames flow: through a filtering Python stage (the README's
no-IPv6 example) not one frame with the forbidden EtherType gets through,
and through the switch every frame arrives only where its destination MAC
says. Without private copies, both leak (113 of 269 IPv6 frames through the
stage, seen before the fix).
"""
import threading

import numpy as np

from tests.rawfront import BUF_BASE, BUF_SIZE, HDR, RING_SIZE, RingFrontend
from vhu.workers.forwarder import APP, DROP, Forwarder

IPV6 = 0x86DD
MAC_A, MAC_B, MAC_C = (bytes.fromhex(m) for m in ("02000000000a", "02000000000b", "02000000000c"))


def no_ipv6(batch):
    return np.where(batch.ethertype == IPV6, DROP, APP)


def frame(dst, src, ethertype, i):
    return dst + src + ethertype.to_bytes(2, "big") + bytes([i & 0xFF]) * 46


class Flipper(threading.Thread):
    """Rewrites one byte of every TX buffer of a front-end, back and forth."""

    def __init__(self, fe, offset, values):
        super().__init__(daemon=True)
        self.fe, self.offset, self.values = fe, offset, [bytes([v]) for v in values]
        self.stop = threading.Event()

    def run(self):
        k = 0
        while not self.stop.is_set():
            v = self.values[k & 1]
            for slot in range(RING_SIZE):
                self.fe.mem.write(BUF_BASE + slot * BUF_SIZE + HDR + self.offset, v)
            k += 1


def pump(sender, receivers, rounds, template):
    """Every TX buffer holds `template`; then rounds of 32 frames are sent
    from them without writing them again (the flipper is the only writer),
    while the receivers keep buffers posted. What each receiver got."""
    for slot in range(RING_SIZE):
        sender.mem.write(BUF_BASE + slot * BUF_SIZE, bytes(HDR) + template)
    got = {id(r): [] for r in receivers}
    for i in range(rounds):
        for r in receivers:
            r.top_up_rx(64)
        sender.resend(32, len(template))
        assert sender.wait_used(32) == 32
        for r in receivers:
            got[id(r)] += r.received()
    for r in receivers:                    # what is still on its way
        for _ in range(20):
            more = r.received()
            got[id(r)] += more
            if not more:
                break
    return [got[id(r)] for r in receivers]


def pump_while_flipping(sender, offset, values, receivers, template, rounds=100):
    """pump() while a Flipper rewrites byte `offset` of the sender's frames."""
    flip = Flipper(sender, offset, values)
    flip.start()
    try:
        return pump(sender, receivers, rounds, template)
    finally:
        flip.stop.set()
        flip.join()


def test_a_stage_cannot_be_bypassed_by_rewriting_the_frame(tmp_path):
    paths = [str(tmp_path / "a.sock"), str(tmp_path / "c.sock")]
    with Forwarder(paths, pipeline=[no_ipv6, "patch"]) as fw:
        a, c = RingFrontend(paths[0]), RingFrontend(paths[1])
        try:                                    # 0x86DD (IPv6) <-> 0x86DC
            (got,) = pump_while_flipping(a, 13, (0xDD, 0xDC), [c], frame(MAC_C, MAC_A, IPV6, 0))
        finally:
            a.close()
            c.close()
        leaked = [f for f in got if f[12:14] == IPV6.to_bytes(2, "big")]
        dropped = fw.stats()[0]["drops_by_reason"]["stage"]
        assert not leaked, f"{len(leaked)} IPv6 frames got through the filter"
        assert got and dropped, f"the race was not exercised: {len(got)} passed, {dropped} dropped"
        assert len(got) + dropped == 3200


def test_the_switch_delivers_what_it_decided_on(tmp_path):
    paths = [str(tmp_path / f"{n}.sock") for n in "abc"]
    with Forwarder(paths, pipeline=["switch"]):
        a, b, c = (RingFrontend(p) for p in paths)
        try:
            for fe, mac in ((b, MAC_B), (c, MAC_C)):       # the switch learns B and C
                fe.send([frame(b"\xff" * 6, mac, 0x0800, 0)])
                assert fe.wait_used(1) == 1
            at_b, at_c = pump_while_flipping(a, 5, (0x0B, 0x0C), [b, c],   # destination B <-> C
                                             frame(MAC_B, MAC_A, 0x0800, 0))
        finally:
            for fe in (a, b, c):
                fe.close()
        wrong_b = [f for f in at_b if f[:6] != MAC_B and f[6:12] == MAC_A]
        wrong_c = [f for f in at_c if f[:6] != MAC_C and f[6:12] == MAC_A]
        assert not wrong_b and not wrong_c, (len(wrong_b), len(wrong_c))
        from_a = [f for f in at_b + at_c if f[6:12] == MAC_A]
        assert len(from_a) == 3200 and any(f[:6] == MAC_B for f in from_a) \
            and any(f[:6] == MAC_C for f in from_a), "the race was not exercised"
