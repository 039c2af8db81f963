"""The bottom layer: utilities every other part may use (statistics, atomic writes, distributed helpers, the
allocator, config key roles). Imports nothing else from metabench."""
