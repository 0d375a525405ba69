"""Training objectives: one module per objective (next-token, preference) over shared log-prob helpers."""
