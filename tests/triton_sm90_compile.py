"""Compile every Triton kernel of gsq_kernels for a Hopper GPU (sm_90a) without one, and report
registers and spills: `python tests/triton_sm90_compile.py` (prints one JSON line per variant).
Run in its own process: TRITON_INTERPRET must be unset when the kernels are defined."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gsq_kernels.backends import triton_kernels as kernels  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def compile_variant(jit_function, signature: dict, constants: dict, num_warps: int, folder: Path) -> dict:
    fn = jit_function.fn if type(jit_function).__name__ == "Autotuner" else jit_function
    full = {name: ("constexpr" if name in constants else signature[name]) for name in fn.arg_names}
    kernel = triton.compile(ASTSource(fn=fn, signature=full, constexprs=constants),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 3})
    ptx = folder / "kernel.ptx"
    ptx.write_text(kernel.asm["ptx"])
    done = subprocess.run([str(PTXAS), "-arch=sm_90a", "-v", str(ptx), "-o", str(folder / "kernel.cubin")],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-1500:])
    spill = registers = 0
    for line in done.stderr.splitlines():
        if "spill stores" in line:
            spill = int(line.split("bytes spill stores")[0].split(",")[-1].strip())
        if "Used" in line and "registers" in line:
            registers = int(line.split("Used")[1].split("registers")[0].strip())
    return {"registers": registers, "spill_bytes": spill}


def variants():
    config = kernels._forward_configs()[0]
    for dtype in ("fp32", "fp16", "bf16"):
        for d in (1, 2, 3, 4, 8, 16, 64, 256):
            use_dot = d >= 16
            block_d = max(16, 1 << (d - 1).bit_length()) if use_dot else 1 << max(0, (d - 1).bit_length())
            pointer = "*" + dtype
            signature = dict(z_ptr=pointer, codes_t_ptr="*fp32", bias_ptr="*fp32", codebook_ptr="*fp32",
                             quantized_ptr=pointer, indices_ptr="*i64", loss_rows_ptr="*fp32", M="i32", V="i32",
                             eps="fp32", loss_scale="fp32")
            constants = dict(D=d, BLOCK_D=block_d, BLOCK_K=min(block_d, 32), USE_DOT=use_dot, L2=True,
                             WRITE_OUTPUTS=True, **config.kwargs)
            yield "forward", dtype, d, kernels.gsq_forward_kernel, signature, constants, config.num_warps
            backward_d = 1 << max(0, (d - 1).bit_length())
            block = kernels.rows_per_program(backward_d)
            signature = dict(z_ptr=pointer, grad_quantized_ptr=pointer, grad_loss_rows_ptr="*fp32", codebook_ptr="*fp32",
                             indices_ptr="*i64", grad_z_ptr=pointer, M="i32", beta="fp32", eps="fp32")
            yield ("backward_z", dtype, d, kernels.gsq_backward_z_kernel, signature,
                   dict(D=d, BLOCK_D=backward_d, L2=True, BLOCK_M=block), 4)
            signature = dict(z_ptr=pointer, grad_loss_rows_ptr="*fp32", codebook_ptr="*fp32", rows_by_code_ptr="*i64",
                             bucket_start_ptr="*i64", grad_codebook_ptr="*fp32", V="i32", eps="fp32")
            yield ("codebook_grad", dtype, d, kernels.gsq_codebook_grad_kernel, signature,
                   dict(D=d, BLOCK_D=backward_d, L2=True, BLOCK_C=block), 4)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        for name, dtype, d, fn, signature, constants, warps in variants():
            record = {"kernel": name, "dtype": dtype, "d": d}
            try:
                record.update(compile_variant(fn, signature, constants, warps, Path(folder)))
            except Exception as error:  # noqa: BLE001 - reported, the test fails on it
                record["error"] = f"{type(error).__name__}: {error}"[:1500]
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
