"""Performance benchmarks (``metabench bench``): meta-iteration speed, step times, episode throughput, process
and thread scaling, FLOP counts and the step profiler."""
