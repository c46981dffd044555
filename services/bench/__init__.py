"""``infermesh bench``: workloads, a streaming client and metrics for routing benchmarks."""
