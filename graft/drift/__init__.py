"""Drift: two-sample tests in the backbone's embedding space, the reference kept with each version."""
