# Guest memory table: declarations shared with _ring (cimport) so buffer
# translation inlines into the ring's nogil loops.
from libc.stdint cimport uint64_t, int64_t

cdef enum:
    VHU_MAX_REGIONS = 509   # ADD_MEM_REG slots (vhost-user spec, GET_MAX_MEM_SLOTS)

cdef struct Region:
    uint64_t gpa          # guest_phys_addr
    uint64_t size         # memory_size
    uint64_t uva          # userspace_addr: the front-end's own address of gpa
    uint64_t mmap_offset  # where the region starts in its fd
    char *host            # our address of gpa

cdef struct MemTable:
    int n
    int last_hit          # index of the region the last lookup found
    Region regions[VHU_MAX_REGIONS]   # sorted by gpa, non-overlapping

cdef class Mapping:
    cdef char *base
    cdef size_t length

cdef class GuestMemory:
    cdef MemTable *table
    cdef list mappings            # Mapping per region, same order as table.regions
    cdef readonly unsigned long long generation
    cdef int _install(self, MemTable *new_table, list new_mappings) except -1
    cdef _build(self, list specs)
    cdef list _current_specs(self)
    cdef object _mapping_of(self, char *p)


cdef inline uint64_t gpa_clip(MemTable *t, uint64_t gpa, uint64_t length, char **out) noexcept nogil:
    """Local address of gpa in *out, and how many of length bytes follow it
    contiguously in that region (clipped at the region end); 0 if unmapped.
    Callers loop to split a buffer that crosses regions (as libvhost-user does)."""
    cdef int lo, hi, mid, i
    cdef Region *r
    cdef uint64_t off, avail
    if t.n == 0:
        return 0
    # Last-hit cache: consecutive buffers almost always sit in the same region.
    r = &t.regions[t.last_hit]
    off = gpa - r.gpa            # wraps to a huge value when gpa < r.gpa
    if off >= r.size:
        # Sorted search: the last region starting at or below gpa.
        lo = 0
        hi = t.n - 1
        i = -1
        while lo <= hi:
            mid = (lo + hi) >> 1
            if t.regions[mid].gpa <= gpa:
                i = mid
                lo = mid + 1
            else:
                hi = mid - 1
        if i < 0:
            return 0
        r = &t.regions[i]
        off = gpa - r.gpa
        if off >= r.size:
            return 0
        t.last_hit = i
    avail = r.size - off
    out[0] = r.host + off
    return length if length < avail else avail


cdef inline char *gpa_to_ptr(MemTable *t, uint64_t gpa, uint64_t length) noexcept nogil:
    """Local address of [gpa, gpa+length) when it lies in one region, else NULL."""
    cdef char *p = NULL
    if length == 0:
        length = 1   # an empty buffer still needs a mapped address
    if gpa_clip(t, gpa, length, &p) != length:
        return NULL
    return p


cdef inline char *uva_to_ptr(MemTable *t, uint64_t uva, uint64_t length) noexcept nogil:
    """The same for a front-end virtual address. Only used at ring set-up, so
    a linear scan (the table is sorted by gpa, not uva)."""
    cdef int i
    cdef Region *r
    cdef uint64_t off
    if length == 0:
        length = 1
    for i in range(t.n):
        r = &t.regions[i]
        off = uva - r.uva
        if off < r.size and length <= r.size - off:
            return r.host + off
    return NULL


cdef object make_view(char *ptr, Py_ssize_t length, object owner)
