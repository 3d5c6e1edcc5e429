"""pytest-benchmark suites for gsq_kernels: `pytest benchmarks/ --benchmark-only`.

shapes.py           the settings (from the paper) shared by tests and benchmarks
implementations.py  how each implementation (backends and peers) runs each mode
probe.py            peak memory of one case, measured in a separate process (a forked child on CPU)
machine.py          machine description and its measured matmul rate
report.py           `python -m benchmarks.report RESULTS.json` -> docs/benchmarks.md + plots
"""
