"""Compile every Triton kernel of gsq_kernels for a Hopper GPU (sm_90a) without one, and report
registers, spills and approximate math instructions: `python tests/triton_sm90_compile.py` prints one
JSON line per variant: each forward tile configuration the autotuner may run for each width
(triton_kernels.forward_configs) in each mode and dtype, and the fixed-shape kernels (~375 variants,
~1 s each). Options: --dims 4,64 to restrict the widths; --quick for fewer modes and dtypes;
--candidates "64x64x16x4x3,..." (BLOCK_M x BLOCK_V x BLOCK_K x warps x stages) to compile
other forward tile shapes instead (to choose forward_configs' tables).
Run in its own process: TRITON_INTERPRET must be unset when the kernels are defined."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gsq_kernels.backends import triton_kernels as kernels  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
NVDISASM = PTXAS.with_name("nvdisasm")
DIMS = (1, 2, 3, 4, 8, 16, 32, 64, 128, 256)
# Square roots, divisions and reciprocals in PTX: each must be correctly rounded (.rn) and keep
# subnormals (no .ftz); tl.sqrt and '/' give sqrt.approx.ftz.f32 and div.full.f32.
ROOTS_AND_DIVISIONS = re.compile(r"\b(?:sqrt|div|rcp|rsqrt)\.[a-z0-9.]+")


def approximate_math(ptx: str) -> list[str]:
    ops = set(ROOTS_AND_DIVISIONS.findall(ptx))
    return sorted(op for op in ops if ".rn." not in op or ".ftz" in op)


def compile_variant(
    jit_function, signature: dict, constants: dict, num_warps: int, num_stages: int, folder: Path
) -> dict:
    fn = jit_function.fn if type(jit_function).__name__ == "Autotuner" else jit_function
    full = {name: ("constexpr" if name in constants else signature[name]) for name in fn.arg_names}
    kernel = triton.compile(
        ASTSource(fn=fn, signature=full, constexprs=constants),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    ptx = folder / "kernel.ptx"
    ptx.write_text(kernel.asm["ptx"])
    done = subprocess.run(
        [str(PTXAS), "-arch=sm_90a", "-v", str(ptx), "-o", str(folder / "kernel.cubin")], capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-1500:])
    spill = registers = 0
    for line in done.stderr.splitlines():
        if "spill stores" in line:
            spill = int(line.split("bytes spill stores")[0].split(",")[-1].strip())
        if "Used" in line and "registers" in line:
            registers = int(line.split("Used")[1].split("registers")[0].strip())
    sass = subprocess.run([str(NVDISASM), "-c", str(folder / "kernel.cubin")], capture_output=True, text=True).stdout
    return {
        "registers": registers,
        "spill_bytes": spill,
        "loop_spills": spills_in_loops(sass),
        "approx": approximate_math(kernel.asm["ptx"]),
    }


def spills_in_loops(sass: str) -> int:
    """Local-memory loads and stores (STL/LDL) inside a loop of the SASS: a loop spans a backward
    branch and its target. A spill outside every loop costs once per program (ptxas saves a register
    or two around the calls to the slow paths of correctly rounded sqrt and division)."""
    labels, pending, instructions = {}, [], []
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        found = re.search(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", line)
        if found:
            address = int(found.group(1), 16)
            labels.update((name, address) for name in pending)
            pending = []
            instructions.append((address, found.group(2)))
    loops = []
    for address, text in instructions:
        branch = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
        if branch and labels.get(branch.group(1), address) < address:
            loops.append((labels[branch.group(1)], address))
    return sum(
        1
        for address, text in instructions
        if re.search(r"\b(?:STL|LDL)\b", text) and any(start <= address <= end for start, end in loops)
    )


def _forward_variants(d: int, tiles: list | None, quick: bool):
    block_d = kernels.forward_block_d(d)
    configs = (
        kernels.forward_configs(block_d)
        if tiles is None
        else [
            triton.Config({"BLOCK_M": m, "BLOCK_V": v, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, v, k, w, s in tiles
        ]
    )
    # The scan reads the float32 workspace; z's dtype only enters the outputs' epilogue ("all").
    modes = [("gap", "fp32"), ("indices", "fp32")] + [("all", dtype) for dtype in ("fp32", "fp16", "bf16")]
    if quick:  # "indices" runs a subset of "gap"'s code; fp16 loads like bf16
        modes = [("gap", "fp32"), ("all", "bf16")]
    for config in configs:
        for mode, dtype in modes:
            pointer = "*" + dtype
            signature = dict(
                z_ptr=pointer,
                n_ptr="*fp32",
                row_denom_ptr="*fp32",
                codes_t_ptr="*fp32",
                bias_ptr="*fp32",
                codebook_ptr="*fp32",
                quantized_ptr=pointer,
                indices_ptr="*i64",
                loss_rows_ptr="*fp32",
                gap_ptr="*fp32",
                M="i32",
                V="i32",
                ROWS_BUCKET="i32",
                loss_scale="fp64",
            )
            constants = dict(
                D=d, BLOCK_D=block_d, L2=True, WRITE_OUTPUTS=mode == "all", WITH_GAP=mode == "gap", **config.kwargs
            )
            name = f"forward[{mode}]"
            yield name, dtype, d, config, kernels.gsq_forward_kernel, signature, constants


def _fixed_variants(d: int, quick: bool):
    block_d = triton.next_power_of_2(d)
    block = kernels.rows_per_program(block_d)
    config = triton.Config({}, num_warps=4, num_stages=3)
    for dtype in ("fp32", "bf16") if quick else ("fp32", "fp16", "bf16"):
        pointer = "*" + dtype
        yield (
            "normalize_rows",
            dtype,
            d,
            config,
            kernels.gsq_normalize_rows_kernel,
            dict(z_ptr=pointer, n_ptr="*fp32", row_denom_ptr="*fp32", M="i32", eps="fp64"),
            dict(D=d, BLOCK_D=block_d, L2=True, BLOCK_M=block),
        )
        yield (
            "backward_z",
            dtype,
            d,
            config,
            kernels.gsq_backward_z_kernel,
            dict(
                z_ptr=pointer,
                grad_quantized_ptr=pointer,
                grad_loss_rows_ptr="*fp32",
                codebook_ptr="*fp32",
                indices_ptr="*i64",
                grad_z_ptr=pointer,
                M="i32",
                beta="fp64",
                eps="fp64",
            ),
            dict(D=d, BLOCK_D=block_d, L2=True, BLOCK_M=block),
        )
        yield (
            "codebook_grad_chunks",
            dtype,
            d,
            config,
            kernels.gsq_codebook_grad_chunks_kernel,
            dict(
                z_ptr=pointer,
                grad_loss_rows_ptr="*fp32",
                codebook_ptr="*fp32",
                rows_by_code_ptr="*i64",
                bucket_start_ptr="*i64",
                chunk_start_ptr="*i64",
                chunk_code_ptr="*i64",
                partial_ptr="*fp32",
                NUM_CHUNKS="i32",
                V="i32",
                eps="fp64",
            ),
            dict(CHUNK=256, D=d, BLOCK_D=block_d, L2=True, BLOCK_Q=block),
        )
    yield (
        "codebook_grad_combine",
        "fp32",
        d,
        config,
        kernels.gsq_codebook_grad_combine_kernel,
        dict(partial_ptr="*fp32", chunk_start_ptr="*i64", grad_codebook_ptr="*fp32", V="i32"),
        dict(D=d, BLOCK_D=block_d, BLOCK_C=block),
    )


def _sorted_variants(d: int):
    """The sorted search (d = 1, and d = 2 with l2 on): float32 only, as the op computes."""
    config = triton.Config({}, num_warps=4, num_stages=3)
    yield (
        "sorted_keys",
        "fp32",
        d,
        config,
        kernels.gsq_sorted_keys_kernel,
        dict(codebook_ptr="*fp32", keys_ptr="*i64", range_ptr="*fp32", V="i32", MAX_BUCKETS="i32", eps="fp64"),
        dict(D=d, L2=True, BLOCK=1024),
    )
    yield (
        "sorted_search",
        "fp32",
        d,
        config,
        kernels.gsq_sorted_search_kernel,
        dict(
            z_ptr="*fp32",
            members_ptr="*i32",
            member_codes_ptr="*fp32",
            bucket_start_ptr="*i64",
            range_ptr="*fp32",
            indices_ptr="*i64",
            M="i32",
            MAX_BUCKETS="i32",
            eps="fp64",
        ),
        dict(D=d, L2=True, EXACT_ROUNDING=True, BLOCK=128),
    )


def variants(dims=DIMS, tiles=None, quick=False):
    for d in dims:
        yield from _forward_variants(d, tiles, quick)
        if tiles is None:
            yield from _fixed_variants(d, quick)
            if d <= 2:
                yield from _sorted_variants(d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default=",".join(map(str, DIMS)))
    parser.add_argument("--candidates", default=None)
    parser.add_argument("--quick", action="store_true", help="forward: gap (fp32) and all (bf16) only; fp32 and bf16")
    args = parser.parse_args()
    dims = [int(d) for d in args.dims.split(",")]
    tiles = (
        None
        if args.candidates is None
        else [tuple(int(x) for x in item.split("x")) for item in args.candidates.split(",")]
    )
    with tempfile.TemporaryDirectory() as folder:
        for name, dtype, d, config, fn, signature, constants in variants(dims, tiles, args.quick):
            record = {"kernel": name, "dtype": dtype, "d": d, "config": str(config)}
            try:
                record.update(
                    compile_variant(fn, signature, constants, config.num_warps, config.num_stages, Path(folder))
                )
            except Exception as error:
                record["error"] = f"{type(error).__name__}: {error}"[:1500]
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
