"""Benchmarks of gsq_kernels: `pytest benchmarks/ --benchmark-only` (CPU, and GPU where present), and
the one-command GPU check `python -m benchmarks.gpu_check`.

shapes.py           the settings (from the paper) shared by tests and benchmarks
implementations.py  how each implementation (backends and peers) runs each mode and lookup mode
probe.py            peak memory of one case, measured in a separate process (a forked child on CPU)
machine.py          machine description, its measured matmul rate and (GPU) fp32 FMA peak
report.py           `python -m benchmarks.report RESULTS.json` -> compact summary, Markdown tables and
                    plots; `--update-docs` rewrites docs/benchmarks.md and README.md's section
gpu_check.py        `python -m benchmarks.gpu_check --setup --out DIR`: GPU tests, sanitizers, timings,
                    training steps, one verdict per check (`--dry-run` on a CPU)
gpu_timings.py      the check's CUDA-event timings and collapsed-codebook backward
gpu_training.py     the check's training steps (reference vs fused quantizer)
sanitizer_sweep.py  the small forward+backward sweep run under compute-sanitizer
"""
