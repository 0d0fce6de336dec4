# The system calls the compiled loops wait and signal with (the worker
# engine and the front-end's traffic loop): eventfds, poll, epoll, the
# monotonic clock. Declarations and inline helpers only, no module.
from libc.stdint cimport uint32_t, uint64_t
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from posix.unistd cimport read, write

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum: EPOLLIN, EPOLLERR, EPOLLHUP, EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CLOEXEC

cdef extern from "<poll.h>" nogil:
    cdef struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum: POLLIN

cdef extern from "<sched.h>" nogil:
    int sched_yield()


cdef inline bint signal_eventfd(int fd) noexcept nogil:
    """Add 1 to an eventfd (a kick or a call); False if fd is unset (< 0).
    A non-blocking eventfd fails only when its counter is saturated, and
    then the peer has a wake-up pending anyway."""
    cdef uint64_t one = 1
    if fd < 0:
        return False
    write(fd, &one, 8)
    return True


cdef inline uint64_t drain_eventfd(int fd) noexcept nogil:
    """Read and reset a non-blocking eventfd: how many signals it held."""
    cdef uint64_t value = 0
    if fd >= 0 and read(fd, &value, 8) == 8:
        return value
    return 0


cdef inline uint64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec
