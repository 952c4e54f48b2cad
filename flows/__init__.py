"""graft's orchestration: the Prefect flow over the DVC stages, and the ``graft`` CLI."""
