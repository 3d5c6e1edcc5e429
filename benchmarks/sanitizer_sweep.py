"""A small forward+backward sweep of the fused backends, for compute-sanitizer (memcheck, racecheck,
initcheck, synccheck) in the GPU check (benchmarks/gpu_check.py):

    compute-sanitizer --tool racecheck python -m benchmarks.sanitizer_sweep --device cuda

Every kernel path at sizes that are not multiples of any block: the CUDA small-d kernels (d = 1, 2,
3, 4, 8) and the tiled one (other d), the Triton kernels at a few widths, float32 / float16 /
bfloat16, l2 on and off, V = 1 and V around a block size, a row count that leaves partial tiles,
every lookup mode gsq_kernels offers, the lookup alone, and a collapsed codebook (every row on code
0: the codebook-gradient reduction at its most contended). Under a sanitizer, --cycle-triton-configs
gives each Triton case one autotuning config in turn instead of autotuning (6 Triton cases: each
of the 6 configs runs once). Each case checks only what any output
must satisfy (indices in range, finite values and gradients); the parity tests check the values.
Prints one line per backend and exits non-zero if a case fails.
"""

from __future__ import annotations

import argparse
import sys

import torch

# (d, V, dtype, l2_normalize) per backend. The CUDA backend compiles nothing at run time, so it
# gets the wide sweep; every Triton case costs compilations (and autotuning) under the sanitizer.
CUDA_CASES = [
    (1, 257, torch.float32, True),
    (2, 255, torch.bfloat16, True),
    (3, 257, torch.float32, True),
    (4, 257, torch.float16, True),
    (4, 1, torch.float32, True),
    (5, 255, torch.float32, True),
    (8, 257, torch.bfloat16, True),
    (16, 257, torch.float32, True),
    (17, 255, torch.float32, True),
    (64, 257, torch.bfloat16, True),
    (256, 33, torch.float32, True),
    (4, 257, torch.float32, False),
    (17, 257, torch.float32, False),
]
TRITON_CASES = [
    (4, 257, torch.float32, True),
    (4, 257, torch.bfloat16, True),
    (17, 255, torch.float32, True),
    (1, 1, torch.float32, True),
    (4, 257, torch.float32, False),
]
CPU_CASES = [(4, 257, torch.float32, True), (17, 33, torch.bfloat16, False), (1, 1, torch.float32, True)]
BATCH, HEIGHT, WIDTH, GROUPS = 2, 5, 7, 3  # 210 group vectors: partial tiles everywhere


def cases_for(backend: str) -> list[tuple]:
    return {"cuda": CUDA_CASES, "triton": TRITON_CASES}.get(backend, CPU_CASES)


def lookups() -> list[tuple[dict, dict]]:
    """(options of the forward, options of the lookup alone) for each lookup mode gsq_kernels offers."""
    from .implementations import lookup_modes

    lookup_only = set(lookup_modes("cpu", "lookup"))
    return [
        ({} if mode is None else {"lookup": mode}, {"lookup": mode} if mode in lookup_only - {None} else {})
        for mode in lookup_modes("cpu", "forward")
    ]


def check_case(
    backend: str, device: str, d: int, num_codes: int, dtype: torch.dtype, l2: bool, collapsed: bool = False
) -> None:
    from gsq_kernels import grouped_spherical_quantize, nearest_code_indices, spherical_init

    generator = torch.Generator().manual_seed(d * 1000 + num_codes)
    codebook = spherical_init(num_codes, d, generator=generator)
    if collapsed:
        rows = codebook[:1].expand(BATCH * HEIGHT * WIDTH * GROUPS, d) + 1e-3 * torch.randn(
            BATCH * HEIGHT * WIDTH * GROUPS, d, generator=generator
        )
        z = rows.reshape(BATCH, HEIGHT, WIDTH, GROUPS * d).permute(0, 3, 1, 2)
    else:
        z = torch.randn(BATCH, GROUPS * d, HEIGHT, WIDTH, generator=generator)
    z = z.to(device=device, dtype=dtype).contiguous().requires_grad_()
    codebook = codebook.to(device).requires_grad_()
    for options, lookup_options in lookups():
        out = grouped_spherical_quantize(z, codebook, GROUPS, l2_normalize=l2, backend=backend, **options)
        (out.quantized.float().square().sum() + out.loss).backward()
        indices = nearest_code_indices(
            z.detach(), codebook.detach(), GROUPS, l2_normalize=l2, backend=backend, **lookup_options
        )
        if device == "cuda":
            torch.cuda.synchronize()
        where = f"{backend} d={d} V={num_codes} {dtype} l2={l2} {options}"
        assert int(out.indices.min()) >= 0 and int(out.indices.max()) < num_codes, f"{where}: index out of range"
        assert torch.equal(indices, out.indices), f"{where}: the lookup alone disagrees with the forward"
        assert torch.isfinite(out.quantized).all() and torch.isfinite(out.loss), f"{where}: non-finite output"
        assert torch.isfinite(z.grad).all() and torch.isfinite(codebook.grad).all(), f"{where}: non-finite gradient"
        if collapsed and l2:
            assert int((out.indices == 0).sum()) == out.indices.numel(), f"{where}: rows left code 0"
        z.grad, codebook.grad = None, None


def triton_autotuners() -> list:
    """The autotuned Triton kernels of the triton backend (empty where Triton is missing)."""
    try:
        from triton.runtime.autotuner import Autotuner

        from gsq_kernels.backends import triton_kernels
    except ImportError:
        return []
    return [obj for obj in vars(triton_kernels).values() if isinstance(obj, Autotuner)]


def sweep(backend: str, device: str, cycle_configs: bool = False) -> int:
    """cycle_configs: case i runs every autotuned Triton kernel with its config i (mod their number)
    and benchmarks none: each config is checked once, without autotuning's dozens of launches per
    config, which a sanitizer slows down 10-100x."""
    failures = 0
    cases = [(*case, False) for case in cases_for(backend)] + [(4, 257, torch.float32, True, True)]
    tuners = [(tuner, list(tuner.configs)) for tuner in triton_autotuners()] if cycle_configs else []
    for i, (d, num_codes, dtype, l2, collapsed) in enumerate(cases):
        for tuner, configs in tuners:
            tuner.configs = [configs[i % len(configs)]]  # one config: Triton runs it without benchmarking
        try:
            check_case(backend, device, d, num_codes, dtype, l2, collapsed)
        except Exception as error:  # reported, the sweep goes on
            failures += 1
            print(
                f"FAIL {backend} d={d} V={num_codes} {dtype} l2={l2} collapsed={collapsed}: "
                f"{type(error).__name__}: {error}",
                flush=True,
            )
    print(f"sweep {backend} on {device}: {len(cases) - failures} of {len(cases)} cases passed", flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sanitizer_sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--backends", default="", help="comma-separated (default: every fused backend of the device)")
    parser.add_argument(
        "--cycle-triton-configs",
        action="store_true",
        help="no autotuning: case i runs Triton config i (for runs under compute-sanitizer)",
    )
    args = parser.parse_args(argv)
    import gsq_kernels

    available = [b for b in gsq_kernels.available_backends(args.device) if b != "reference"]
    chosen = [b for b in args.backends.split(",") if b] or available
    missing = [b for b in chosen if b not in available]
    if missing:
        print(f"not available on {args.device}: {', '.join(missing)}\n{gsq_kernels.backend_report()}", flush=True)
    failures = sum(sweep(backend, args.device, args.cycle_triton_configs) for backend in chosen if backend in available)
    return 1 if failures or missing or not chosen else 0


if __name__ == "__main__":
    sys.exit(main())
