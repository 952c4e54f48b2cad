"""Registry: logging a candidate, the promotion gate, aliases with their history."""
