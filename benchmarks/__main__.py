"""``python -m metabench``: the ``metabench`` command (also what Lightning's DDP launcher re-runs per process)."""

from metabench.cli import main

raise SystemExit(main())
