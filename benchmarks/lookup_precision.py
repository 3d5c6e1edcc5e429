"""How often each lookup picks the nearest code at the headline setting (d = 2, V = 262,144).

    python -m benchmarks.lookup_precision [--rows 1048576] [--backend auto] [--out docs/lookup-precision.md]

Uniformly random group vectors against a spherical_init codebook, in batches of 131,072 rows.
The truth is lookup="exact" (its sorted search proves every winner; tests/test_exact_lookup.py
checks it against the float64 oracle); lookup="dot" is the fp32 dot product of the official code,
lowest index on exact ties. Prints a markdown table; --out also writes it to a file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from gsq_kernels import nearest_code_indices, spherical_init

BATCH_ROWS = 131_072


def measure(rows: int, num_codes: int, d: int, backend: str, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    codebook = spherical_init(num_codes, d, generator=generator)
    stats = {
        mode: {"nearest": 0, "used": torch.zeros(num_codes, dtype=torch.bool), "index_sum": 0, "seconds": 0.0}
        for mode in ("dot", "exact")
    }
    for start in range(0, rows, BATCH_ROWS):
        z = torch.randn(min(BATCH_ROWS, rows - start), d, generator=generator)
        chosen = {}
        for mode in ("dot", "exact"):
            began = time.perf_counter()
            chosen[mode] = nearest_code_indices(z, codebook, 1, backend=backend, lookup=mode).reshape(-1)
            stats[mode]["seconds"] += time.perf_counter() - began
        for mode, indices in chosen.items():
            stats[mode]["nearest"] += int((indices == chosen["exact"]).sum())
            stats[mode]["used"][indices] = True
            stats[mode]["index_sum"] += int(indices.sum())
    return {
        mode: {
            "nearest_percent": 100.0 * s["nearest"] / rows,
            "usage_percent": 100.0 * float(s["used"].float().mean()),
            "mean_index": s["index_sum"] / rows,
            "seconds": s["seconds"],
        }
        for mode, s in stats.items()
    }


def table(results: dict, rows: int, num_codes: int, d: int, backend: str) -> str:
    lines = [
        f"Lookup precision: d = {d}, V = {num_codes:,}, {rows:,} uniformly random group vectors, "
        f"spherical_init codebook, backend {backend!r}.",
        "",
        "| lookup | rows that get the nearest code | codebook usage | mean chosen index | lookup time |",
        "|---|---|---|---|---|",
    ]
    names = {"dot": "`dot` (fp32 dot product, lowest index on ties)", "exact": "`exact` (the default)"}
    for mode in ("dot", "exact"):
        r = results[mode]
        lines.append(
            f"| {names[mode]} | {r['nearest_percent']:.1f}% | {r['usage_percent']:.1f}% | "
            f"{r['mean_index']:,.0f} | {r['seconds']:.2f} s |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_048_576, help="random group vectors (default 1,048,576)")
    parser.add_argument("--codes", type=int, default=262_144, help="codebook size V (default 262,144)")
    parser.add_argument("--dim", type=int, default=2, help="group width d (default 2)")
    parser.add_argument("--backend", default="auto", help="gsq_kernels backend (default auto)")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.codes < 1 or args.dim < 1:
        parser.error("--rows, --codes and --dim must be >= 1")
    results = measure(args.rows, args.codes, args.dim, args.backend)
    text = table(results, args.rows, args.codes, args.dim, args.backend)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
