# cython: language_level=3
"""A worker's fault guard: which port's memory killed it (see fault_guard.h).

    install(shared, offset)       once, with the worker's slot in shared memory
    set_ranges([(addr, length, port), ...])   after every memory table change

The slot is three u64s (signal, address, port + 1) that the master reads
after the worker died (vhu.workers.supervisor).
"""
from libc.stdint cimport uint64_t, uintptr_t, int64_t

cdef extern from "fault_guard.h" nogil:
    int VHU_FAULT_MAX_RANGES
    int vhu_fault_install(volatile uint64_t *slot)
    void vhu_fault_begin()
    int vhu_fault_add(uintptr_t start, uintptr_t length, int64_t port, int i)
    void vhu_fault_commit(int n)

MAX_RANGES = VHU_FAULT_MAX_RANGES
SLOT_WORDS = 3

cdef object _slot_owner = None      # keeps the shared buffer mapped while installed


def install(buffer, Py_ssize_t offset):
    """Catch SIGBUS/SIGSEGV in this process and record them at buffer[offset:]."""
    global _slot_owner
    cdef unsigned char[::1] mv = buffer
    if offset < 0 or offset % 8 or offset + SLOT_WORDS * 8 > mv.shape[0]:
        raise ValueError("the fault slot must be 3 aligned u64s inside the buffer")
    _slot_owner = buffer
    if vhu_fault_install(<volatile uint64_t *>&mv[offset]) != 0:
        raise OSError("sigaction/sigaltstack failed")


def set_ranges(ranges):
    """The guest mappings of this process: (address, length, port) each."""
    cdef int i = 0
    rows = list(ranges)
    if len(rows) > VHU_FAULT_MAX_RANGES:
        rows = rows[:VHU_FAULT_MAX_RANGES]       # unattributed beyond: still a crash, no port named
    vhu_fault_begin()
    for start, length, port in rows:
        vhu_fault_add(<uintptr_t>start, <uintptr_t>length, <int64_t>port, i)
        i += 1
    vhu_fault_commit(i)
