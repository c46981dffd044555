"""The system: one description of every process infermesh runs, and the plan built from it."""
