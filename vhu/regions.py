"""The rule for a memory table a front-end gives us, arithmetic only.

Spec: vhost-user.rst, "Memory regions description" (SET_MEM_TABLE,
ADD_MEM_REG, REM_MEM_REG). One owner for this rule: the sans-I/O protocol
layer (vhu.protocol.backend) checks a table with it before it keeps an fd,
and the memory core (vhu._mem) again before it maps one, each raising its
own error type.

Every field comes from the front-end. A region is (guest_phys_addr,
memory_size, userspace_addr, mmap_offset); the table is refused when any
field is not a u64, a size is 0, a region's end (start + size, exclusive)
does not fit in 64 bits in any of its three address spaces (C code computes
that end in uint64_t: an end of exactly 2**64 would wrap to 0), or two
regions overlap in guest-physical or in front-end user addresses.
"""

U64_MAX = (1 << 64) - 1
# The most regions a table may have: the spec's largest slot count
# (GET_MAX_MEM_SLOTS answers are at most this), and vhu._mem's table size.
MAX_REGIONS = 509


class RegionTableError(ValueError):
    """The table is refused; the message names the region and the reason."""


def check_region_table(regions, max_regions=MAX_REGIONS):
    """Validate (gpa, size, uva, mmap_offset) tuples as one table; raise
    RegionTableError with the first reason found."""
    rs = [tuple(int(x) for x in r) for r in regions]
    if len(rs) > max_regions:
        raise RegionTableError(f"{len(rs)} regions, at most {max_regions}")
    for i, (gpa, size, uva, off) in enumerate(rs):
        for name, v in (("guest_phys_addr", gpa), ("memory_size", size),
                        ("userspace_addr", uva), ("mmap_offset", off)):
            if not 0 <= v <= U64_MAX:
                raise RegionTableError(f"region {i}: {name} {v:#x} is not a u64")
        if size == 0:
            raise RegionTableError(f"region {i}: memory_size is 0")
        for name, v in (("guest_phys_addr", gpa), ("userspace_addr", uva), ("mmap_offset", off)):
            if v + size > U64_MAX:
                raise RegionTableError(f"region {i}: {name} {v:#x} + size {size:#x} wraps "
                                       f"(its end does not fit in 64 bits)")
    for key, name in ((0, "guest_phys_addr"), (2, "userspace_addr")):
        order = sorted(range(len(rs)), key=lambda j: rs[j][key])
        for a, b in zip(order, order[1:]):
            if rs[a][key] + rs[a][1] > rs[b][key]:
                raise RegionTableError(
                    f"regions {a} and {b} overlap in {name} "
                    f"([{rs[a][key]:#x}, +{rs[a][1]:#x}) and [{rs[b][key]:#x}, +{rs[b][1]:#x}))")


def check_log_area(mmap_size, mmap_offset, fd_size=None):
    """The dirty log of SET_LOG_BASE (vhost-user "Migration"), checked as a
    region is: mmap_size and mmap_offset u64s, a size that is not 0, an end
    (offset + size) that fits in 64 bits and, once the fd's real size is
    known (fd_size, from fstat), lies inside the fd. Raises RegionTableError."""
    size, off = int(mmap_size), int(mmap_offset)
    for name, v in (("mmap_size", size), ("mmap_offset", off)):
        if not 0 <= v <= U64_MAX:
            raise RegionTableError(f"log: {name} {v:#x} is not a u64")
    if size == 0:
        raise RegionTableError("log: mmap_size is 0")
    if off + size > U64_MAX:
        raise RegionTableError(f"log: mmap_offset {off:#x} + size {size:#x} wraps "
                               f"(its end does not fit in 64 bits)")
    if fd_size is not None and off + size > int(fd_size):
        raise RegionTableError(f"log: fd is {int(fd_size):#x} bytes, the log needs offset "
                               f"{off:#x} + size {size:#x}")
