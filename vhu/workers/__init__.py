"""Worker processes and the embeddable pipeline (vhu.workers.Forwarder)."""
from vhu.workers.forwarder import APP, DROP, Batch, Forwarder, TapDevice, VhostUserPort

__all__ = ["Forwarder", "VhostUserPort", "TapDevice", "Batch", "DROP", "APP"]
