"""Guest memory: the regions a vhost-user front-end shares, mapped and translated.

Compiled core (vhu/_mem.pyx). No I/O beyond mmap/munmap/fstat of the fds handed in.
"""
from typing import Sequence

MAX_REGIONS: int  # 509: the most slots ADD_MEM_REG may fill (vhost-user spec)

class GuestMemoryError(ValueError):
    """A region table or an address that cannot be accepted; the message says why."""

RegionSpec = tuple[int, int, int, int, int]
"""(fd, guest_phys_addr, memory_size, userspace_addr, mmap_offset), as vhost-user sends it."""

class GuestMemory:
    """The table of mapped regions; replaced whole or changed one region at a time.

    The caller keeps ownership of the fds it passes: each region is mmap()ed
    MAP_SHARED from its fd and the fd may be closed right after the call.
    Mappings outlive the table while a zero-copy view still points into them.
    """
    def __init__(self) -> None: ...
    def set_table(self, regions: Sequence[RegionSpec]) -> None:
        """SET_MEM_TABLE: validate and map all regions, then swap the table (all or nothing)."""
    def add_region(self, fd: int, guest_phys_addr: int, memory_size: int,
                   userspace_addr: int, mmap_offset: int) -> None:
        """ADD_MEM_REG."""
    def remove_region(self, guest_phys_addr: int, memory_size: int, userspace_addr: int) -> None:
        """REM_MEM_REG: the region matching all three fields; GuestMemoryError if none does."""
    def clear(self) -> None: ...
    @property
    def nregions(self) -> int: ...
    @property
    def generation(self) -> int:
        """Bumped at every table change; rings compare it to know they must re-translate."""
    def regions(self) -> list[tuple[int, int, int, int]]:
        """(guest_phys_addr, memory_size, userspace_addr, mmap_offset), sorted by guest_phys_addr."""
    def translate(self, guest_phys_addr: int, length: int) -> int:
        """Local address of [gpa, gpa+length) lying in one region; GuestMemoryError otherwise."""
    def translate_uva(self, userspace_addr: int, length: int) -> int:
        """The same for a front-end virtual address (ring addresses of SET_VRING_ADDR)."""
    def segments(self, guest_phys_addr: int, length: int) -> list[tuple[int, int]]:
        """[gpa, gpa+length) split at region boundaries: [(local address, length), ...]."""
    def view(self, guest_phys_addr: int, length: int) -> memoryview:
        """Writable zero-copy view of a buffer lying in one region; keeps its mapping alive."""
    def view_uva(self, userspace_addr: int, length: int) -> memoryview: ...
    def read(self, guest_phys_addr: int, length: int) -> bytes:
        """Copy out, across region boundaries."""
    def write(self, guest_phys_addr: int, data: bytes) -> None:
        """Copy in, across region boundaries."""

def live_mappings() -> int:
    """Mappings currently alive in this process (in the table or held by a view)."""

def check_region_table(regions: Sequence[tuple[int, int, int, int]]) -> None:
    """Validate (guest_phys_addr, memory_size, userspace_addr, mmap_offset) tuples as one
    table, arithmetic only (no fds): GuestMemoryError with the first reason found."""
