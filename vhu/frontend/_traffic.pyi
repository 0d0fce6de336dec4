"""The front-end's compiled data path (vhu/frontend/_traffic.pyx): tx, rx and loop over Q queue pairs."""
from vhu._mem import GuestMemory

MODES: tuple[str, ...]          # ("tx", "rx", "loop")
POLL_MODES: tuple[str, ...]     # ("busy", "adaptive")
ETHERTYPE: int                  # 0x88B5, IEEE local experimental
FRAME_LAYOUT: dict[str, int]    # offsets after the Ethernet header: seq (u64), queue (u16), pattern
MIN_PKT_SIZE: int
COUNTER_NAMES: tuple[str, ...]

class Traffic:
    sending: bool
    def __init__(self, mem: GuestMemory, queues: list[tuple], mode: str, *, pkt_size: int,
                 hdr_len: int, mergeable: bool, tx_slot: int, rx_slot: int, batch: int = 32,
                 poll: str = "busy", count: int = 0, idle_spins: int = 2000,
                 loss_timeout: float = 0.2) -> None:
        """queues: (tx DriverRing, rx DriverRing, tx_kick, rx_kick, tx_call, rx_call,
        tx_buf_gpa, rx_buf_gpa) per queue pair."""
    def run(self, seconds: float) -> int:
        """Move frames for up to `seconds` without the GIL; -1 if the back-end broke a ring."""
    def counters(self) -> dict[str, int]: ...
    def queue_counters(self, i: int) -> dict[str, int]: ...
    def in_flight(self) -> tuple[int, int]:
        """(TX frames not returned by the device, loop frames not back yet)."""
    def done(self) -> bool:
        """The count limit is reached and every frame is complete (tx, loop: back from the device)."""
    def stop_sending(self) -> None: ...
    def finish(self) -> None:
        """Loop mode, after the drain: what never came back counts as missing."""
