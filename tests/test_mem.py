"""vhu._mem: region tables as vhost-user sends them, translation, views, lifetime."""
import os
import random

import numpy as np
import pytest

from vhu._mem import MAX_REGIONS, GuestMemory, GuestMemoryError, check_region_table, live_mappings

PAGE = os.sysconf("SC_PAGESIZE")


def memfd(size, name="guest"):
    fd = os.memfd_create(name)
    os.ftruncate(fd, size)
    return fd


@pytest.fixture
def fd():
    f = memfd(1 << 24)
    yield f
    os.close(f)


def test_qemu_style_table_with_mmap_offset(fd):
    # QEMU 7.2 (trace-qemu-7.2-guest-boot.txt): one memfd, the second region
    # starts at a non-zero, page-aligned offset into it.
    os.pwrite(fd, b"low", 0x10)
    os.pwrite(fd, b"high", 0xC0000 + 0x20)
    mem = GuestMemory()
    mem.set_table([(fd, 0x0, 0xA0000, 0x7F47EBFFF000, 0x0),
                   (fd, 0xC0000, 0xF40000, 0x7F47EC0BF000, 0xC0000)])
    assert mem.read(0x10, 3) == b"low"
    assert mem.read(0xC0020, 4) == b"high"
    # Ring addresses come as front-end virtual addresses.
    assert bytes(mem.view_uva(0x7F47EC0BF000 + 0x20, 4)) == b"high"
    assert mem.translate_uva(0x7F47EC0BF020, 4) == mem.translate(0xC0020, 4)


def test_whole_range_checked(fd):
    mem = GuestMemory()
    mem.set_table([(fd, 0x1000, 0x10000, 0x500000, 0)])
    mem.translate(0x1000, 0x10000)
    for gpa, ln in [(0x0, 0x10), (0xFFF, 2), (0x10FFF, 2), (0x1000, 0x10001), (0x11000, 1),
                    (2**64 - 1, 1)]:
        with pytest.raises(GuestMemoryError):
            mem.translate(gpa, ln)
        with pytest.raises(GuestMemoryError):
            mem.view(gpa, ln)


def test_buffer_crossing_regions_is_split_never_overrun(fd):
    mem = GuestMemory()
    # Adjacent in guest-physical space, far apart in the fd: two mappings.
    mem.set_table([(fd, 0x0, 0x2000, 0x900000, 0x100000), (fd, 0x2000, 0x2000, 0x902000, 0x0)])
    data = bytes(range(256)) * 16
    mem.write(0x1800, data[:0x1000])
    segs = mem.segments(0x1800, 0x1000)
    assert [n for _, n in segs] == [0x800, 0x800]
    assert mem.read(0x1800, 0x1000) == data[:0x1000]
    assert os.pread(fd, 0x800, 0x100000 + 0x1800) == data[:0x800]
    assert os.pread(fd, 0x800, 0) == data[0x800:0x1000]
    with pytest.raises(GuestMemoryError):
        mem.view(0x1800, 0x1000)      # a view must lie in one region
    with pytest.raises(GuestMemoryError):
        mem.segments(0x3800, 0x1000)  # runs off the end of guest memory


@pytest.mark.parametrize("regions,reason", [
    ([(0, 0, 0, 0)], "memory_size is 0"),
    ([(2**64 - 0x1000, 0x2000, 0, 0)], "guest_phys_addr .* wraps"),
    ([(0, 0x2000, 2**64 - 0x1000, 0)], "userspace_addr .* wraps"),
    ([(0, 0x2000, 0, 2**64 - 0x1000)], "mmap_offset .* wraps"),
    ([(0, 0x1000, 0, 2**64 - 0x1000)], "mmap_offset .* wraps"),     # ends at exactly 2**64
    ([(2**64 - 0x1000, 0x1000, 0, 0)], "guest_phys_addr .* wraps"),
    ([(0, 0x2000, 0x10000, 0), (0x1000, 0x1000, 0x20000, 0)], "overlap in guest_phys_addr"),
    ([(0, 0x1000, 0x10000, 0), (0x1000, 0x1000, 0x10800, 0)], "overlap in userspace_addr"),
    ([(i * 0x1000, 0x1000, i * 0x1000, 0) for i in range(MAX_REGIONS + 1)], "at most 509"),
])
def test_bad_tables_rejected(fd, regions, reason):
    with pytest.raises(GuestMemoryError, match=reason):
        check_region_table(regions)
    mem = GuestMemory()
    mem.set_table([(fd, 0, 0x1000, 0, 0)])
    with pytest.raises(GuestMemoryError, match=reason):
        mem.set_table([(fd, *r) for r in regions])
    assert mem.nregions == 1, "a rejected table leaves the old one in place"


def test_bad_fds_rejected(tmp_path):
    mem = GuestMemory()
    small = memfd(0x1000)
    with pytest.raises(GuestMemoryError, match="bytes, region needs"):
        mem.set_table([(small, 0, 0x2000, 0, 0)])   # would SIGBUS on first touch
    with pytest.raises(GuestMemoryError, match="Bad file descriptor"):
        mem.set_table([(9999, 0, 0x1000, 0, 0)])
    r, w = os.pipe()
    with pytest.raises(GuestMemoryError, match="not a memory file"):
        mem.set_table([(r, 0, 0x1000, 0, 0)])
    for f in (small, r, w):
        os.close(f)
    assert live_mappings() == 0


def test_views_alias_guest_memory_and_outlive_the_table(fd):
    base = live_mappings()
    mem = GuestMemory()
    mem.set_table([(fd, 0x0, 0x100000, 0x10000000, 0)])
    view = mem.view(0x100, 64)
    arr = np.frombuffer(mem.view(0x200, 16), dtype=np.uint8)
    view[:4] = b"vhu!"
    arr[:] = 7
    assert os.pread(fd, 4, 0x100) == b"vhu!"
    assert os.pread(fd, 16, 0x200) == bytes([7]) * 16
    mem.set_table([(fd, 0x0, 0x1000, 0x10000000, 0)])   # replaced: old mapping held by views
    assert live_mappings() == base + 2
    view[0:1] = b"V"                                     # still valid memory
    assert os.pread(fd, 1, 0x100) == b"V"
    del view
    assert live_mappings() == base + 2                   # arr still holds it
    del arr
    assert live_mappings() == base + 1
    mem.clear()
    assert live_mappings() == base


def test_add_and_remove_regions(fd):
    mem = GuestMemory()
    gen = mem.generation
    mem.add_region(fd, 0x100000, 0x1000, 0x7000000, 0x3000)
    mem.add_region(fd, 0x0, 0x1000, 0x6000000, 0x0)
    assert [r[0] for r in mem.regions()] == [0x0, 0x100000]
    assert mem.generation == gen + 2
    with pytest.raises(GuestMemoryError, match="overlap"):
        mem.add_region(fd, 0x100800, 0x1000, 0x8000000, 0)
    os.pwrite(fd, b"x", 0x3000)
    view = mem.view(0x100000, 1)
    mem.remove_region(0x100000, 0x1000, 0x7000000)
    assert bytes(view) == b"x"            # the view keeps the removed region's mapping
    with pytest.raises(GuestMemoryError):
        mem.translate(0x100000, 1)
    with pytest.raises(GuestMemoryError, match="no region"):
        mem.remove_region(0x100000, 0x1000, 0x7000000)


def test_many_regions_lookup(fd):
    # 509 slots (ADD_MEM_REG's maximum), with holes, looked up in random order.
    mem = GuestMemory()
    for i in range(MAX_REGIONS):
        mem.add_region(fd, i * 0x3000, 0x1000, 0x40000000 + i * 0x1000, (i % 64) * 0x1000)
    assert mem.nregions == MAX_REGIONS
    rng = random.Random(1)
    for _ in range(5000):
        i = rng.randrange(MAX_REGIONS)
        off = rng.randrange(0x1000)
        assert mem.translate(i * 0x3000 + off, 1) - mem.translate(i * 0x3000, 1) == off
        with pytest.raises(GuestMemoryError):
            mem.translate(i * 0x3000 + 0x1000 + off, 1)   # the hole after each region
    with pytest.raises(GuestMemoryError, match="at most"):
        mem.add_region(fd, 0x10000000, 0x1000, 0x1000, 0)
