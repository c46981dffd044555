"""The OpenAI-compatible ingress: tokenize, schedule, proxy to the chosen engine."""
