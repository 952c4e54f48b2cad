"""Models: backbones, the saved graft model, the pretrained model with a new head, the registered pyfunc."""
