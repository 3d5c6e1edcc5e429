"""What the C++/CUDA extension is built from, shared by setup.py and the import-time rebuild.

Kept free of package imports (setup.py loads this file by path, before gsq_kernels is importable).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
from pathlib import Path

EXTENSION_NAME = "gsq_kernels._C"
BUILD_INFO_FILE = "_C_build_info.json"
# Compute capabilities built when no GPU is visible at build time and TORCH_CUDA_ARCH_LIST is unset
# (a container or login node): Ampere, Ada, Hopper, Blackwell, plus PTX for newer cards.
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0;10.0;12.0+PTX"


def source_root() -> Path:
    """The csrc/ folder: beside the package in a checkout, or inside it when installed from a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here / "csrc"):
        if (candidate / "gsq_ops.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"gsq_kernels: the C++ sources (csrc/) are not beside {here}")


def _is_toolkit(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / "bin" / "nvcc").exists() and (folder / "include" / "cuda_runtime.h").exists()


def resolve_cuda_home() -> str | None:
    """The CUDA toolkit folder, exported as CUDA_HOME for torch.utils.cpp_extension.

    torch guesses CUDA_HOME from the nvcc on PATH, which goes wrong when that nvcc is a wrapper
    script (e.g. /usr/local/bin/nvcc -> CUDA_HOME=/usr/local, which has no CUDA headers)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var] if _is_toolkit(os.environ[var]) else None
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, str(Path(os.path.realpath(nvcc)).parent.parent))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for folder in candidates:
        if _is_toolkit(folder):
            os.environ["CUDA_HOME"] = folder
            if "torch.utils.cpp_extension" in sys.modules:
                sys.modules["torch.utils.cpp_extension"].CUDA_HOME = folder
            return folder
    return None


def cuda_toolkit_status() -> tuple[bool, str]:
    """(build the CUDA kernels?, why not). Needs a CUDA build of torch and nvcc, not a GPU."""
    if os.environ.get("GSQ_NO_CUDA", "0") == "1":
        return False, "GSQ_NO_CUDA=1 is set"
    import torch

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if resolve_cuda_home() is None:
        return False, ("no CUDA toolkit found (nvcc and include/cuda_runtime.h); set CUDA_HOME to the toolkit folder")
    return True, ""


# The torch glue: the only sources that include torch headers, which cost ~10 s of compiler time
# per translation unit (more than the kernels themselves). They are compiled as one unit,
# TORCH_GLUE_UNIT, which #includes them (CUDA's only when built with CUDA), so those headers are
# parsed once per build instead of three times.
TORCH_GLUE = ("gsq_ops.cpp", "gsq_autograd.cpp", "cpu/gsq_cpu.cpp", "cuda/gsq_cuda.cpp")
TORCH_GLUE_UNIT = "gsq_torch_glue.cpp"


def sources(with_cuda: bool) -> list[str]:
    """The translation units to compile (paths): the torch glue unit, the torch-free CPU kernels
    (one per instruction set) and, with CUDA, the .cu kernels."""
    root = source_root()
    folders = ["", "cpu"] + (["cuda"] if with_cuda else [])
    files = [str(root / TORCH_GLUE_UNIT)]
    for folder in folders:
        for path in sorted((root / folder).glob("*.cpp")):
            name = path.relative_to(root).as_posix()
            if name not in TORCH_GLUE and name != TORCH_GLUE_UNIT:
                files.append(str(path))
    if with_cuda:
        files += sorted(str(path) for path in (root / "cuda").glob("*.cu"))
    return files


def input_files() -> list[Path]:
    """Every file a build reads from csrc/ (compiled or included): what decides whether a cached
    build is still current."""
    root = source_root()
    return sorted(path for path in root.rglob("*") if path.suffix in (".cpp", ".h", ".cu", ".cuh"))


def include_dirs(with_cuda: bool) -> list[str]:
    dirs = [str(source_root())]
    if with_cuda:
        # The pip CUDA wheels keep cuBLAS/cuSPARSE headers (needed by torch's CUDA headers) here,
        # not in a slim toolkit.
        for site in sys.path:
            for sub in (
                "nvidia/cu13/include",
                "nvidia/cuda_runtime/include",
                "nvidia/cublas/include",
                "nvidia/cusparse/include",
            ):
                path = Path(site) / sub
                if path.is_dir() and str(path) not in dirs:
                    dirs.append(str(path))
    return dirs


def debug_build() -> bool:
    """GSQ_DEBUG_BUILD=1 keeps debug information: host -g and device -lineinfo (for gdb, perf,
    compute-sanitizer and Nsight Compute's source view). Release builds carry none (Python's own
    CFLAGS add -g; -lineinfo doubles the GPU code): the CUDA build is 5.7 MB instead of 21 MB."""
    return os.environ.get("GSQ_DEBUG_BUILD", "0") == "1"


def cxx_flags(with_cuda: bool) -> list[str]:
    # -ffp-contract=fast lets a*b+c become one FMA in the kernels' inner loop (ISO C++ mode turns
    # contraction off by default); the scan and the re-scoring share one code path, so a code's
    # score is still computed identically wherever it is computed.
    # -fopenmp: at::parallel_for is a header template that only forks threads when the extension
    # itself is compiled with OpenMP; the libgomp it links is the one torch has already loaded.
    # -g / -g0 last: it overrides the -g of Python's CFLAGS, which come first on the command line.
    # -fno-math-errno: no kernel reads errno, and a sqrt that may set it cannot be vectorized.
    # -fno-wrapv undoes the -fwrapv of Python's CFLAGS: with wrapping int arithmetic GCC cannot
    # treat code[2 * i] as a stride-2 access, and loads each element alone (the sorted search's
    # classification of the codes ran 1.6x slower).
    flags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", "-fno-wrapv", "-Wno-unused-function"]
    flags.append("-g" if debug_build() else "-g0")
    if with_cuda:
        flags.append("-DGSQ_WITH_CUDA")
    return flags


def link_flags() -> list[str]:
    return ["-fopenmp"] + ([] if debug_build() else ["-Wl,--strip-debug"])


def nvcc_threads() -> str:
    """nvcc compiles the architectures of one .cu file one after the other unless told to use
    threads: as many as MAX_JOBS allows (the limit users already set for ninja), else one per core."""
    jobs = os.environ.get("MAX_JOBS", "")
    return jobs if jobs.isdigit() and int(jobs) > 0 else "0"  # 0: nvcc uses every core


def nvcc_flags() -> list[str]:
    flags = ["-O3", "--expt-relaxed-constexpr", "-DGSQ_WITH_CUDA", f"--threads={nvcc_threads()}"]
    return flags + (["-lineinfo", "-Xcompiler=-g"] if debug_build() else [])


def nvcc_gpu_codes() -> set[str] | None:
    """The real architectures the toolkit's nvcc can generate ({"80", "90", "100", ...}), from
    `nvcc --list-gpu-code`; None when there is no nvcc or it cannot say."""
    home = resolve_cuda_home()
    if home is None:
        return None
    import subprocess

    try:
        out = subprocess.run(
            [str(Path(home) / "bin" / "nvcc"), "--list-gpu-code"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    codes = {line.strip()[3:] for line in out.splitlines() if line.strip().startswith("sm_")}
    return codes or None


def ensure_cuda_arch_list() -> None:
    """cpp_extension needs an arch list when it cannot see a GPU; pick a broad default then: real
    code for every architecture of DEFAULT_CUDA_ARCH_LIST that this nvcc can generate (not torch's
    own list: our kernels are compiled by that nvcc, and e.g. 8.9 gets its own code even where
    torch ships none), PTX for the newest."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return
    supported = nvcc_gpu_codes()
    if supported is None:
        supported = {a.split("_")[-1] for a in torch.cuda.get_arch_list() if a.startswith("sm_")}
    archs = [a for a in DEFAULT_CUDA_ARCH_LIST.split(";") if a.split("+")[0].replace(".", "") in supported]
    if not archs:
        archs = ["8.0", "9.0+PTX"]
    archs = [a.removesuffix("+PTX") for a in archs]
    archs[-1] += "+PTX"
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)


def build_info(with_cuda: bool, cuda_reason: str = "") -> dict:
    """What the library was built against (checked at import), and why it has no CUDA kernels."""
    import torch

    info = {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "with_cuda": bool(with_cuda),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "debug": debug_build(),
    }
    if not with_cuda:
        info["cuda_skipped"] = cuda_reason or "unknown"
    return info


def write_build_info(folder: str | os.PathLike, with_cuda: bool, cuda_reason: str = "") -> Path:
    path = Path(folder) / BUILD_INFO_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(build_info(with_cuda, cuda_reason), indent=2) + "\n")
    os.replace(tmp, path)
    return path
