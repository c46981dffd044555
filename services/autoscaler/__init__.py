"""The autoscaler service (docs/autoscaler.md)."""
