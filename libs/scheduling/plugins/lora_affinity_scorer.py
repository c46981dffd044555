"""LoRA-affinity scorer: prefers engines that already run the request's adapter."""

from __future__ import annotations

from infermesh.proto.messages import ScheduleRequest

from ..framework import CycleState, Handle, Parameters, Pod, Scorer


class LoraAffinityScorer(Scorer):
    """For a request with a LoRA adapter: ``running`` when the engine runs it, ``loaded`` when
    it holds it (loaded, idle: ``PodState.lora.loaded``), ``waiting`` when requests for it wait
    there, ``available`` when it has room for one more adapter, else 0. A request without an
    adapter scores 1 everywhere (no preference).

    Parameters: ``running`` (1.0), ``loaded`` (0.9), ``waiting`` (0.8), ``available`` (0.5),
    each in [0, 1].
    """

    type_name = "lora-affinity-scorer"

    def __init__(
        self, name: str, *, running: float = 1.0, loaded: float = 0.9, waiting: float = 0.8,
        available: float = 0.5,
    ) -> None:
        super().__init__(name)
        self.running = running
        self.loaded = loaded
        self.waiting = waiting
        self.available = available

    @classmethod
    def create(cls, name: str, params: Parameters, handle: Handle) -> LoraAffinityScorer:
        """Factory for the registry."""
        kw = {k: params.number(k, d, min=0.0, max=1.0)
              for k, d in (("running", 1.0), ("loaded", 0.9), ("waiting", 0.8),
                           ("available", 0.5))}
        params.done()
        return cls(name, **kw)

    async def score(
        self, request: ScheduleRequest, cycle: CycleState, pods: list[Pod]
    ) -> dict[str, float]:
        """Adapter affinity per pod."""
        lora = request.lora_name
        if not lora:
            return dict.fromkeys((p.name for p in pods), 1.0)
        out: dict[str, float] = {}
        for p in pods:
            info = p.state.lora
            if lora in info.running:
                out[p.name] = self.running
            elif lora in info.loaded:
                out[p.name] = self.loaded
            elif lora in info.waiting:
                out[p.name] = self.waiting
            elif info.max_lora <= 0 or len(info.running) + len(info.waiting) < info.max_lora:
                out[p.name] = self.available
            else:
                out[p.name] = 0.0
        return out
