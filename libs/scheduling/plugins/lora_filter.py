"""LoRA filter: keeps the engines that can serve the request's adapter."""

from __future__ import annotations

from infermesh.proto.messages import ScheduleRequest

from ..framework import CycleState, Filter, Handle, Parameters, Pod


def serves(pod: Pod, adapter: str) -> bool:
    """Whether the pod's heartbeat says it serves ``adapter``: loaded, running or waiting, or
    loadable on demand from its LoRA directory (``PodState.adapters``)."""
    st = pod.state
    lora = st.lora
    return (adapter in st.adapters or adapter in lora.loaded or adapter in lora.running
            or adapter in lora.waiting)


class LoraFilter(Filter):
    """For a request with a LoRA adapter, keeps the pods that serve it (loaded, or loadable on
    demand); when none does, every pod stays (the engine answers, e.g. loads the adapter by a
    resolver of its own, or says 404). A request without an adapter keeps every pod.

    Which of the serving pods holds the adapter already is the ``lora-affinity-scorer``'s
    business: this filter only keeps requests off engines that would refuse them.

    Parameters: none.
    """

    type_name = "lora-filter"

    @classmethod
    def create(cls, name: str, params: Parameters, handle: Handle) -> LoraFilter:
        """Factory for the registry."""
        params.done()
        return cls(name)

    def filter(self, request: ScheduleRequest, cycle: CycleState, pods: list[Pod]) -> list[Pod]:
        """The pods serving the request's adapter, or all of them."""
        adapter = request.lora_name
        if not adapter:
            return pods
        kept = [p for p in pods if serves(p, adapter)]
        return kept or pods
