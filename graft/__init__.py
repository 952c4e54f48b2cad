"""graft's library, in layers: ``base`` (errors, atomic I/O, arrays, images, threads,
kernels, distributed) under ``config`` (params.yaml and graft.yaml) under the domain
(``data``, ``modalities``, ``models``, ``training``, ``evaluation``, ``drift``,
``registry``, ``tracking``), under ``stage`` (how a stage's ``main`` ends). The stages
(``stages/``), the flows and the CLI (``flows/``) sit on top. ``pyproject.toml``'s
import-linter contract keeps every import pointing down."""
