"""Readers, splits, prepared caches, episode sampling and DataModules (``metabench.datasets``)."""
