"""graft's pipeline stages: each module is a pure core plus a thin ``main()`` that
``dvc.yaml`` runs as ``python -m stages.<name>``."""
