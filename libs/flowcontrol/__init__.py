"""Flow control: requests wait in the router while their pool is saturated, in priority bands,
fairly between tenants, in arrival or deadline order (docs/flow-control.md)."""

from .queue import FAIRNESS, ORDERING, Fairness, FlowQueue, Ordering, QueueFull, Ticket
from .saturation import PodLoad, Thresholds, pod_saturated, pool_saturated

__all__ = ["FAIRNESS", "ORDERING", "Fairness", "FlowQueue", "Ordering", "PodLoad", "QueueFull",
           "Thresholds", "Ticket", "pod_saturated", "pool_saturated"]
