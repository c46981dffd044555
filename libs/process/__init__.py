"""Processes: start, supervise, wait for readiness, stop; ports; the run file."""
