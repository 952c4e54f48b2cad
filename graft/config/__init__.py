"""Config layer: params.yaml (hyperparameters, one section per stage) and graft.yaml (how graft runs)."""
