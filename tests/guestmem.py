"""Test helper (not a test module): memfd-backed "guest" memory shared by a
driver side and a device side, the way a vhost-user front-end and vhu share it.

    guest = make_guest(size=8 << 20, regions=4, gpa_base=0x100000, hole=0)

- Each region is its own memfd, mapped from a non-zero mmap_offset, so the
  device's translation must use the offset.
- Regions are adjacent in guest-physical space when hole == 0 (buffers may
  cross a region boundary: two mappings, two segments) and separated by
  `hole` unmapped bytes otherwise.
- Front-end virtual addresses (uva) are unrelated to gpa, so mixing the two
  address spaces up fails loudly.
- guest.device_mem and guest.driver_mem are two vhu._mem.GuestMemory objects
  over the same fds (two mappings, like two processes); guest.read/write/view
  go through our own mmap of the files, independent of the code under test.
- The whole memory starts filled with a background pattern, so snapshot()
  and changed_ranges() can prove what a device did or did not write.
"""
import mmap
import os
import struct

from vhu._mem import GuestMemory

PAGE = mmap.PAGESIZE
UVA_BASE = 0x7F12_0000_0000


def _pattern(n, seed):
    # Background bytes: a 251-byte cycle (prime, so it never lines up with
    # ring or buffer sizes) shifted by the region number.
    cycle = bytes((i * 7 + seed * 13 + 0x5A) & 0xFF for i in range(251))
    return (cycle * (n // 251 + 1))[:n]


class Region:
    __slots__ = ("gpa", "size", "uva", "mmap_offset", "map")

    def __init__(self, gpa, size, uva, mmap_offset, mapping):
        self.gpa = gpa
        self.size = size
        self.uva = uva
        self.mmap_offset = mmap_offset
        self.map = mapping          # our mmap of the whole file (offset included)

    @property
    def end(self):
        return self.gpa + self.size


class Guest:
    """See the module docstring. Use make_guest() or Guest(...) as a context manager."""

    def __init__(self, size=8 << 20, regions=1, gpa_base=0x100000, hole=0):
        if regions < 1:
            raise ValueError("at least one region")
        region_size = max(PAGE, (size // regions) // PAGE * PAGE)
        self.regions = []
        table = []
        fds = []
        try:
            for i in range(regions):
                fd = os.memfd_create(f"vhu-test-guest-{i}")
                fds.append(fd)
                # Non-zero, varying offsets into each file.
                offset = PAGE * (1 + (i * 3) % 5)
                os.ftruncate(fd, offset + region_size)
                mapping = mmap.mmap(fd, offset + region_size)
                mapping[offset:offset + region_size] = _pattern(region_size, i)
                gpa = gpa_base + i * (region_size + hole)
                uva = UVA_BASE + i * 0x4000_0000 + 0x123 * PAGE
                self.regions.append(Region(gpa, region_size, uva, offset, mapping))
                table.append((fd, gpa, region_size, uva, offset))
            self.table = table
            self.device_mem = GuestMemory()
            self.device_mem.set_table(table)
            self.driver_mem = GuestMemory()
            self.driver_mem.set_table(table)
        finally:
            # GuestMemory keeps its own mappings; the fds are not needed.
            for fd in fds:
                os.close(fd)
        self._cursor = self.regions[0].gpa

    # -- lifetime ------------------------------------------------------------

    def close(self):
        for r in self.regions:
            try:
                r.map.close()
            except BufferError:
                pass   # a test still holds a view; the mapping goes with it

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- addresses -------------------------------------------------------------

    @property
    def start(self):
        return self.regions[0].gpa

    @property
    def end(self):
        return self.regions[-1].end

    def region_of(self, gpa):
        for r in self.regions:
            if r.gpa <= gpa < r.end:
                return r
        return None

    def uva(self, gpa):
        r = self.region_of(gpa)
        if r is None:
            raise ValueError(f"gpa {gpa:#x} is not mapped")
        return r.uva + (gpa - r.gpa)

    def boundaries(self):
        """gpas where one region ends and the next starts right there."""
        return [a.end for a, b in zip(self.regions, self.regions[1:]) if a.end == b.gpa]

    def unmapped_gpa(self):
        """An address no region covers (a hole, or past the end)."""
        for a, b in zip(self.regions, self.regions[1:]):
            if a.end < b.gpa:
                return a.end + (b.gpa - a.end) // 2
        return self.end + 0x10000

    # -- bump allocator in gpa space --------------------------------------------

    def alloc(self, n, align=16, cross=False):
        """gpa of n fresh bytes aligned to `align`. By default they lie in one
        region; with cross=True they straddle a region boundary (n >= 2)."""
        if cross:
            return self._alloc_crossing(n, align)
        for r in self.regions:
            if r.end <= self._cursor:
                continue
            start = max(self._cursor, r.gpa)
            start = (start + align - 1) // align * align
            if start + n <= r.end:
                self._cursor = start + n
                return start
        raise MemoryError(f"guest memory exhausted allocating {n} bytes")

    def _alloc_crossing(self, n, align):
        if n < 2:
            raise ValueError("a crossing buffer needs at least 2 bytes")
        for boundary in self.boundaries():
            start = (boundary - max(1, n // 2)) // align * align
            if start >= self._cursor and start < boundary < start + n:
                nxt = self.region_of(boundary)
                if start + n <= nxt.end:
                    self._cursor = start + n
                    return start
        raise MemoryError(f"no region boundary left for a crossing buffer of {n} bytes")

    def can_cross(self, n=2):
        return any(b - max(1, n // 2) >= self._cursor for b in self.boundaries())

    # -- raw access through our own mapping (not through vhu._mem) ---------------

    def _pieces(self, gpa, n):
        out = []
        while n > 0:
            r = self.region_of(gpa)
            if r is None:
                raise ValueError(f"gpa {gpa:#x} is not mapped")
            off = gpa - r.gpa
            k = min(n, r.size - off)
            out.append((r, r.mmap_offset + off, k))
            gpa += k
            n -= k
        return out

    def read(self, gpa, n):
        return b"".join(bytes(r.map[o:o + k]) for r, o, k in self._pieces(gpa, n))

    def write(self, gpa, data):
        data = bytes(data)
        done = 0
        for r, o, k in self._pieces(gpa, len(data)):
            r.map[o:o + k] = data[done:done + k]
            done += k

    def view(self, gpa, n):
        """Writable memoryview of [gpa, gpa+n), which must lie in one region."""
        r = self.region_of(gpa)
        if r is None or gpa + n > r.end:
            raise ValueError(f"[{gpa:#x}, +{n:#x}) is not inside one region")
        o = r.mmap_offset + gpa - r.gpa
        return memoryview(r.map)[o:o + n]

    def u16(self, gpa):
        return struct.unpack("<H", self.read(gpa, 2))[0]

    def put_u16(self, gpa, value):
        self.write(gpa, struct.pack("<H", value & 0xFFFF))

    # -- proving what was (not) written ----------------------------------------

    def snapshot(self):
        return [bytes(r.map[r.mmap_offset:r.mmap_offset + r.size]) for r in self.regions]

    def changed_ranges(self, before):
        """[(gpa, length)] of bytes that differ from the snapshot `before`."""
        out = []
        for r, old in zip(self.regions, before):
            new = r.map[r.mmap_offset:r.mmap_offset + r.size]
            if new == old:
                continue
            i, n = 0, len(old)
            while i < n:
                if new[i:i + 4096] == old[i:i + 4096]:
                    i += 4096           # skip equal stretches quickly
                elif new[i] == old[i]:
                    i += 1
                else:
                    j = i
                    while j < n and new[j] != old[j]:
                        j += 1
                    out.append((r.gpa + i, j - i))
                    i = j
        return out


def make_guest(size=8 << 20, regions=1, gpa_base=0x100000, hole=0):
    return Guest(size=size, regions=regions, gpa_base=gpa_base, hole=hole)


def ring_addresses(guest, size):
    """Allocate a split ring of `size` entries: (desc, avail, used) gpas,
    each part in one region with the alignment virtio 1.x requires."""
    desc = guest.alloc(16 * size, align=16)
    avail = guest.alloc(6 + 2 * size, align=2)
    used = guest.alloc(6 + 8 * size, align=4)
    return desc, avail, used
