"""Tracking: where MLflow runs go and what every run carries."""
