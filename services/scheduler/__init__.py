"""The scheduler: picks an engine for each request with a YAML-configured plugin pipeline."""
