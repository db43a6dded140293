"""The kvstore master: index, allocation, leases, eviction and the control-plane RPCs."""

from kvstore.master.core import Master

__all__ = ["Master"]
