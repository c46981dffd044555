"""Autoscaling decisions: the saturation and SLO analyzers, and the per-pool policy that bounds
and smooths them (the autoscaler service runs one :class:`PoolDecider` per pool)."""

from .policy import Bounds, Decision, Inputs, PoolDecider
from .saturation import ReplicaLoad, SaturationModel, SaturationView, analyze
from .slo import SLOTargets, SLOView, SLOWindow, replicas_for

__all__ = ["Bounds", "Decision", "Inputs", "PoolDecider", "ReplicaLoad", "SLOTargets", "SLOView",
           "SLOWindow", "SaturationModel", "SaturationView", "analyze", "replicas_for"]
