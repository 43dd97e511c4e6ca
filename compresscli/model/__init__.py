"""What the tool knows about a model, with nothing read from disk: its blocks and named groups (architecture.py),
how it is run on a batch and judged (tasks.py, metrics.py), and made-up inputs of its shape (inputs.py)."""
