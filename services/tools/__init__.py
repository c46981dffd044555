"""Operator and tool-author commands (`infermesh events`, `infermesh schema`)."""
