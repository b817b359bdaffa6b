"""Population ops: one file per op, each with its kernel, launcher and torch reference."""
