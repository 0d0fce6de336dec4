"""Worker processes and the embeddable pipeline (vhu.workers.Forwarder)."""
from vhu.workers.forwarder import APP, DROP, Batch, Forwarder, VhostUserPort

__all__ = ["Forwarder", "VhostUserPort", "Batch", "DROP", "APP"]
