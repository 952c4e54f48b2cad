"""The registry: versions and aliases with their history (kill-safe moves, repair,
permissions), and loading registered teachers."""
