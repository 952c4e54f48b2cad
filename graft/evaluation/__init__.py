"""Evaluation: metrics, plots and serving costs of a fine-tuned model on the test split."""
