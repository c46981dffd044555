"""The fleet console: a live web page of the pods, routing decisions, hit rate and autoscaler
state, fed from the bus (docs/console.md)."""
