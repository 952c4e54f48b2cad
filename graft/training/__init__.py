"""Training: the fine-tuning loop and its parts, and the teacher of knowledge distillation."""
