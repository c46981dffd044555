"""infermesh: a distributed LLM inference control plane for fleets of vLLM servers."""

__version__ = "0.1.0"
