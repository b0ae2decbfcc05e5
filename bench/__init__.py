"""trinfer benchmarks: the harness (bench/harness.py), one script per kernel, and the GPU check.

See bench/README.md. Run a script with `python -m bench.bench_rms_norm` (or `python bench/bench_rms_norm.py`)
from the repository root.
"""
