"""metabench: a computer-vision benchmark suite for gradient-based meta-learning."""

__version__ = "0.1.0"
