# cython: language_level=3
"""Guest memory: the regions a vhost-user front-end shares with us.

Spec: vhost-user "Memory regions description" / SET_MEM_TABLE, ADD_MEM_REG,
REM_MEM_REG (docs/interop/vhost-user.rst).

Trust model: every field of a region comes from the front-end and may be
wrong on purpose. A table is accepted only whole: no empty region, no
address range that wraps, no overlap in guest-physical or front-end virtual
space, an fd that is a regular file at least offset+size long (a shorter
one would SIGBUS us on first touch), and at most MAX_REGIONS regions.
Translation never returns a pointer whose [p, p+len) is not inside one
mapping.

Lifetime: the table is replaced whole (a new C array), so a ring that keeps
a pointer into an old table must re-translate (the generation counter tells
it). Each region's mmap belongs to a Mapping object; zero-copy views hold a
reference to it, so memory a view still points into is unmapped only when
the last view goes.
"""
from cpython.buffer cimport PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED
from posix.stat cimport struct_stat, fstat, S_ISREG
from posix.unistd cimport sysconf, _SC_PAGESIZE
from libc.errno cimport errno
from libc.string cimport strerror

from vhu import regions as _regions

__all__ = ["GuestMemory", "GuestMemoryError", "MAX_REGIONS", "check_region_table",
           "live_mappings"]

MAX_REGIONS = VHU_MAX_REGIONS
assert MAX_REGIONS == _regions.MAX_REGIONS, "vhu._mem's table holds what vhu.regions allows"
cdef long _live_mappings = 0


class GuestMemoryError(ValueError):
    """A region table or an address that cannot be accepted; the message says why."""


def live_mappings():
    """Mappings alive in this process (in a table or held by a view)."""
    return _live_mappings


def check_region_table(regions):
    """vhu.regions' rule (its one owner), raising GuestMemoryError."""
    try:
        _regions.check_region_table(regions, MAX_REGIONS)
    except _regions.RegionTableError as e:
        raise GuestMemoryError(str(e)) from None


cdef class Mapping:
    """One MAP_SHARED mapping of a region fd; unmapped when the last user goes."""

    def __dealloc__(self):
        global _live_mappings
        if self.base != NULL:
            munmap(self.base, self.length)
            self.base = NULL
            _live_mappings -= 1


cdef Mapping _map_region(int fd, uint64_t size, uint64_t offset, char **host):
    """mmap [offset, offset+size) of fd, aligned as the fd requires."""
    global _live_mappings
    cdef struct_stat st
    cdef uint64_t align, map_off, map_len
    cdef void *p
    if fd < 0:
        raise GuestMemoryError(f"bad fd {fd}")
    if fstat(fd, &st) != 0:
        raise GuestMemoryError(f"fd {fd}: fstat failed: {strerror(errno).decode()}")
    if not S_ISREG(st.st_mode):
        raise GuestMemoryError(f"fd {fd} is not a memory file (memfd, shm or hugetlbfs)")
    if <uint64_t>st.st_size < offset + size:
        raise GuestMemoryError(
            f"fd {fd} is {st.st_size:#x} bytes, region needs offset {offset:#x} + size {size:#x}")
    # hugetlbfs reports its page size in st_blksize and requires that alignment.
    align = <uint64_t>sysconf(_SC_PAGESIZE)
    if <uint64_t>st.st_blksize > align and (st.st_blksize & (st.st_blksize - 1)) == 0:
        align = <uint64_t>st.st_blksize
    map_off = offset & ~(align - 1)
    map_len = (size + (offset - map_off) + align - 1) & ~(align - 1)
    p = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, map_off)
    if p == MAP_FAILED:
        raise GuestMemoryError(
            f"fd {fd}: mmap of {map_len:#x} bytes at {map_off:#x} failed: {strerror(errno).decode()}")
    cdef Mapping m = Mapping.__new__(Mapping)
    m.base = <char *>p
    m.length = map_len
    _live_mappings += 1
    host[0] = <char *>p + (offset - map_off)
    return m


cdef class BufferView:
    """Exports [ptr, ptr+length) through the buffer protocol; keeps its mapping alive."""
    cdef char *ptr
    cdef Py_ssize_t length
    cdef object owner
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]

    def __getbuffer__(self, Py_buffer *buf, int flags):
        self.shape[0] = self.length
        self.strides[0] = 1
        buf.buf = self.ptr
        buf.obj = self
        buf.len = self.length
        buf.readonly = 0
        buf.itemsize = 1
        buf.format = "B"
        buf.ndim = 1
        buf.shape = self.shape
        buf.strides = self.strides
        buf.suboffsets = NULL
        buf.internal = NULL

    def __releasebuffer__(self, Py_buffer *buf):
        pass


cdef object make_view(char *ptr, Py_ssize_t length, object owner):
    cdef BufferView v = BufferView.__new__(BufferView)
    v.ptr = ptr
    v.length = length
    v.owner = owner
    return memoryview(v)


cdef class GuestMemory:
    """The table of mapped regions (see the module docstring for the rules)."""

    def __cinit__(self):
        self.table = <MemTable *>malloc(sizeof(MemTable))
        if self.table == NULL:
            raise MemoryError()
        self.table.n = 0
        self.table.last_hit = 0
        self.mappings = []
        self.generation = 0

    def __dealloc__(self):
        free(self.table)
        self.table = NULL

    cdef int _install(self, MemTable *new_table, list new_mappings) except -1:
        # Swap the whole table at once; old mappings go when their last view goes.
        cdef MemTable *old = self.table
        self.table = new_table
        self.mappings = new_mappings
        self.generation += 1
        free(old)
        return 0

    cdef _build(self, list specs):
        """Map (fd, gpa, size, uva, offset) specs and install them sorted by gpa.
        specs whose fd is None reuse the mapping given as their 6th item."""
        check_region_table([s[1:5] for s in specs])
        cdef MemTable *t = <MemTable *>malloc(sizeof(MemTable))
        if t == NULL:
            raise MemoryError()
        cdef list maps = []
        cdef char *host
        cdef int i
        specs = sorted(specs, key=lambda s: s[1])
        try:
            for i, s in enumerate(specs):
                fd, gpa, size, uva, off = s[:5]
                if fd is None:     # kept from the current table
                    host = <char *><uintptr_t>s[6]
                    maps.append(s[5])
                else:
                    maps.append(_map_region(fd, size, off, &host))
                t.regions[i].gpa = gpa
                t.regions[i].size = size
                t.regions[i].uva = uva
                t.regions[i].mmap_offset = off
                t.regions[i].host = host
            t.n = len(specs)
            t.last_hit = 0
        except BaseException:
            free(t)
            raise          # the new Mapping objects unmap as `maps` dies
        self._install(t, maps)

    cdef list _current_specs(self):
        cdef int i
        cdef Region *r
        out = []
        for i in range(self.table.n):
            r = &self.table.regions[i]
            out.append((None, r.gpa, r.size, r.uva, r.mmap_offset, self.mappings[i],
                        <uintptr_t>r.host))
        return out

    def set_table(self, regions):
        """SET_MEM_TABLE: regions are (fd, guest_phys_addr, memory_size,
        userspace_addr, mmap_offset). All or nothing; the caller keeps its fds."""
        specs = [tuple(int(x) for x in r) for r in regions]
        for s in specs:
            if len(s) != 5:
                raise GuestMemoryError("a region is (fd, guest_phys_addr, memory_size, userspace_addr, mmap_offset)")
        self._build(specs)

    def add_region(self, fd, guest_phys_addr, memory_size, userspace_addr, mmap_offset):
        """ADD_MEM_REG."""
        specs = self._current_specs()
        specs.append((int(fd), int(guest_phys_addr), int(memory_size),
                      int(userspace_addr), int(mmap_offset)))
        self._build(specs)

    def remove_region(self, guest_phys_addr, memory_size, userspace_addr):
        """REM_MEM_REG: the region matching all three fields."""
        specs = self._current_specs()
        key = (int(guest_phys_addr), int(memory_size), int(userspace_addr))
        kept = [s for s in specs if (s[1], s[2], s[3]) != key]
        if len(kept) == len(specs):
            raise GuestMemoryError(
                f"no region with guest_phys_addr {key[0]:#x} size {key[1]:#x} userspace_addr {key[2]:#x}")
        self._build(kept)

    def clear(self):
        cdef MemTable *t = <MemTable *>malloc(sizeof(MemTable))
        if t == NULL:
            raise MemoryError()
        t.n = 0
        t.last_hit = 0
        self._install(t, [])

    @property
    def nregions(self):
        return self.table.n

    def regions(self):
        cdef int i
        return [(self.table.regions[i].gpa, self.table.regions[i].size,
                 self.table.regions[i].uva, self.table.regions[i].mmap_offset)
                for i in range(self.table.n)]

    def host_ranges(self):
        """(address, length) of every mapping in the current table: where in
        this process the front-end's memory lies (fault attribution)."""
        cdef Mapping m
        return [(<uintptr_t>m.base, m.length) for m in self.mappings[:self.table.n]]

    cdef object _mapping_of(self, char *p):
        cdef int i
        cdef Mapping m
        for i in range(self.table.n):
            m = self.mappings[i]
            if m.base <= p < m.base + m.length:
                return m
        return None

    def translate(self, uint64_t guest_phys_addr, uint64_t length):
        """Local address of [gpa, gpa+length) lying in one region."""
        cdef char *p = gpa_to_ptr(self.table, guest_phys_addr, length)
        if p == NULL:
            raise GuestMemoryError(
                f"guest_phys_addr {guest_phys_addr:#x} + {length:#x} is not inside one region")
        return <uintptr_t>p

    def translate_uva(self, uint64_t userspace_addr, uint64_t length):
        cdef char *p = uva_to_ptr(self.table, userspace_addr, length)
        if p == NULL:
            raise GuestMemoryError(
                f"userspace_addr {userspace_addr:#x} + {length:#x} is not inside one region")
        return <uintptr_t>p

    def segments(self, uint64_t guest_phys_addr, uint64_t length):
        """[gpa, gpa+length) split at region boundaries: [(local address, length)]."""
        cdef char *p = NULL
        cdef uint64_t n
        if length and guest_phys_addr + length - 1 < guest_phys_addr:
            raise GuestMemoryError(f"guest_phys_addr {guest_phys_addr:#x} + {length:#x} wraps")
        out = []
        while length:
            n = gpa_clip(self.table, guest_phys_addr, length, &p)
            if n == 0:
                raise GuestMemoryError(f"guest_phys_addr {guest_phys_addr:#x} is not mapped")
            out.append((<uintptr_t>p, n))
            guest_phys_addr += n
            length -= n
        return out

    def view(self, uint64_t guest_phys_addr, uint64_t length):
        """Writable zero-copy view of a buffer lying in one region."""
        cdef char *p = gpa_to_ptr(self.table, guest_phys_addr, length)
        if p == NULL:
            raise GuestMemoryError(
                f"guest_phys_addr {guest_phys_addr:#x} + {length:#x} is not inside one region")
        return make_view(p, length, self._mapping_of(p))

    def view_uva(self, uint64_t userspace_addr, uint64_t length):
        cdef char *p = uva_to_ptr(self.table, userspace_addr, length)
        if p == NULL:
            raise GuestMemoryError(
                f"userspace_addr {userspace_addr:#x} + {length:#x} is not inside one region")
        return make_view(p, length, self._mapping_of(p))

    def read(self, uint64_t guest_phys_addr, uint64_t length):
        """Copy out, across region boundaries."""
        segs = self.segments(guest_phys_addr, length)
        out = PyBytes_FromStringAndSize(NULL, length)
        cdef char *dst = PyBytes_AS_STRING(out)
        for addr, n in segs:
            memcpy(dst, <char *><uintptr_t>addr, n)
            dst += <size_t>n
        return out

    def write(self, uint64_t guest_phys_addr, const unsigned char[:] data):
        """Copy in, across region boundaries."""
        cdef size_t done = 0
        for addr, n in self.segments(guest_phys_addr, data.shape[0]):
            memcpy(<char *><uintptr_t>addr, &data[done], n)
            done += <size_t>n
