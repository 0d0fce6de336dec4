"""Worker processes and the embeddable pipeline (vhu.workers.Forwarder).

Two layers share this package: the worker side and its supervisor (process,
channel, supervisor, the compiled engine), which the control loop
(vhu.control) uses, and the Forwarder, which uses the control loop. So the
Forwarder's names are loaded on first use: importing vhu.workers.process
never pulls the layer above it in.
"""
__all__ = ["Forwarder", "VhostUserPort", "TapDevice", "VxlanPort", "Batch", "DROP", "APP"]


def __getattr__(name):
    if name in __all__:
        from vhu.workers import forwarder
        return getattr(forwarder, name)
    raise AttributeError(f"module 'vhu.workers' has no attribute {name!r}")
