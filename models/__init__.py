"""Backbones, the functional inner loop and the Lightning algorithms (``metabench.models``)."""
