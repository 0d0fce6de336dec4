"""The one ring layout rule (vhu.ring_layout) and its users: the reference ring
(vhu.refring) and the compiled ring (vhu._ring), device and driver side.
The protocol layer's use (SET_VRING_ADDR, and its INFO line) is in test_protocol.py.

The layout that matters is the Vapp reference client's `struct vhost_vring`
with 32768 entries: two ints, then the descriptor table (at +8), the avail
ring right after it (+524 296) and the used ring 4096-aligned (+593 920).
"""
import pytest

from tests.guestmem import make_guest
from vhu import refring, ring_layout
from vhu.ring_layout import MisalignedRing, check_alignment, part_lengths, ring_parts

try:
    from vhu import _ring as compiled
except ImportError:      # not built yet
    compiled = None

IMPLS = [pytest.param(refring, id="ref"),
         pytest.param(compiled, id="compiled",
                      marks=pytest.mark.skipif(compiled is None, reason="vhu._ring is not built"))]
impls = pytest.mark.parametrize("impl", IMPLS)

VAPP_SIZE = 32768
VAPP_DESC, VAPP_AVAIL, VAPP_USED = 8, 524_296, 593_920     # offsets in the region


def test_vapp_offsets_follow_from_its_struct():
    # struct vhost_vring { int kickfd, callfd; struct vring_desc desc[32768];
    #   struct vring_avail avail __aligned(2); struct vring_used used __aligned(4096); }
    desc_len, avail_len, used_len = part_lengths(VAPP_SIZE)
    assert VAPP_DESC == 2 * 4 and VAPP_AVAIL == VAPP_DESC + desc_len
    assert VAPP_USED == (VAPP_AVAIL + 4 + 2 * VAPP_SIZE + 4095) // 4096 * 4096


def test_rule_linux_vhost_accepts():
    # descriptors: 8 needed (u64 loads), 16 in the spec; avail 2; used 4
    assert check_alignment(0x1000, 0x2000, 0x3000) == []
    assert check_alignment(VAPP_DESC, VAPP_AVAIL, VAPP_USED) == [
        "descriptor table at 0x8 is 8- but not 16-byte aligned"]
    for bad, what in (((4, 0x2000, 0x3000), "descriptor table at 0x4 is not 8-byte aligned"),
                      ((0, 0x2001, 0x3000), "avail ring at 0x2001 is not 2-byte aligned"),
                      ((0, 0x2000, 0x3002), "used ring at 0x3002 is not 4-byte aligned")):
        with pytest.raises(MisalignedRing, match=what):
            check_alignment(*bad)
    # packed: event suppression areas stay at the spec's 4
    assert check_alignment(8, 4, 4, packed=True) == [
        "descriptor ring at 0x8 is 8- but not 16-byte aligned"]
    with pytest.raises(MisalignedRing, match="driver event area at 0x6 is not 4-byte aligned"):
        check_alignment(0, 6, 8, packed=True)


def test_part_lengths_and_names():
    assert part_lengths(256) == (4096, 518, 2054)
    assert part_lengths(255, packed=True) == (4080, 4, 4)
    assert part_lengths(0) == (16, 4, 4)           # before SET_VRING_NUM: headers only
    parts = ring_parts(0x10, 0x20, 0x30, 8)
    assert [p.name for p in parts] == list(ring_layout.SPLIT_PARTS)
    assert [(p.addr, p.length) for p in parts] == [(0x10, 128), (0x20, 22), (0x30, 70)]


@impls
def test_both_rings_use_the_lengths_of_the_rule(impl):
    for k in range(16):
        assert impl.split_ring_layout(1 << k) == part_lengths(1 << k)


@impls
def test_vapp_layout_carries_frames(impl):
    """Device and driver ring on Vapp's layout (descriptors 8 bytes into the
    region): accepted by both sides, and frames go through byte for byte."""
    region = 1 << 20
    with make_guest(size=region) as g:
        base = g.alloc(region - 0x1000, align=0x1000)
        desc, avail, used = base + VAPP_DESC, base + VAPP_AVAIL, base + VAPP_USED
        drv = impl.DriverRing(g.driver_mem, VAPP_SIZE, desc, avail, used)
        dev = impl.DeviceRing(g.device_mem, VAPP_SIZE, g.uva(desc), g.uva(avail), g.uva(used))
        bufs = base + 0x100000 - 0x10000
        frames = [bytes([i]) * 70 for i in range(1, 9)]
        for i, f in enumerate(frames):
            g.write(bufs + 128 * i, f)
            drv.add([(bufs + 128 * i, len(f))])
        drv.publish()
        chains = dev.pop(32)
        assert [b"".join(bytes(v) for v in c.readable) for c in chains] == frames
        for c in chains:
            dev.push(c.head, 0)
        dev.publish()
        assert len(drv.get_used()) == len(frames)


@impls
@pytest.mark.parametrize("which", ["desc", "avail", "used"])
def test_below_the_rule_is_refused_on_both_sides(impl, which):
    with make_guest(size=1 << 20) as g:
        base = g.alloc(0x10000, align=0x1000)
        addrs = {"desc": base + 0x100, "avail": base + 0x2000, "used": base + 0x4000}
        addrs[which] += {"desc": 4, "avail": 1, "used": 2}[which]
        with pytest.raises(impl.RingError, match="not .-byte aligned"):
            impl.DriverRing(g.driver_mem, 64, addrs["desc"], addrs["avail"], addrs["used"])
        with pytest.raises(impl.RingError, match="not .-byte aligned"):
            impl.DeviceRing(g.device_mem, 64, *(g.uva(addrs[k]) for k in ("desc", "avail", "used")))
