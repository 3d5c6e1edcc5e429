"""Builds gsq_kernels._C: the CPU kernels always; the CUDA kernels too whenever torch is a CUDA build
and nvcc is found (no GPU needed). Use `pip install -e .`, or `pip install --no-build-isolation -e .`
to build against the torch already installed.

GSQ_REQUIRE_CUDA=1 turns "no CUDA toolkit, CPU kernels only" into an error (CI sets it); a CUDA
source that fails to compile always fails the build. GSQ_NO_CUDA=1 skips the CUDA kernels.
GSQ_DEBUG_BUILD=1 keeps debug information (release builds strip it). MAX_JOBS=N caps the parallel
compile jobs (ninja's and nvcc's); the default uses every core. pip shows the compiler's lines
only with -v."""

import importlib.util
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_gsq_build_config", ROOT / "gsq_kernels" / "_build_config.py")
build_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_config)


def make_extension():
    build_config.resolve_cuda_home()  # before torch guesses it from PATH
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda, reason = build_config.cuda_toolkit_status()
    if not with_cuda and os.environ.get("GSQ_REQUIRE_CUDA", "0") == "1":
        raise RuntimeError(f"gsq_kernels: GSQ_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    if with_cuda:
        build_config.ensure_cuda_arch_list()
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "auto")
        print(f"gsq_kernels: building CPU and CUDA kernels (TORCH_CUDA_ARCH_LIST={arch_list})")
        extension_type = CUDAExtension
        extra = {"cxx": build_config.cxx_flags(True), "nvcc": build_config.nvcc_flags()}
    else:
        print(f"gsq_kernels: building CPU kernels only; CUDA skipped: {reason}")
        extension_type = CppExtension
        extra = {"cxx": build_config.cxx_flags(False)}
    sources = [os.path.relpath(s, ROOT) for s in build_config.sources(with_cuda)]
    extension = extension_type(
        name=build_config.EXTENSION_NAME,
        sources=sources,
        include_dirs=build_config.include_dirs(with_cuda),
        extra_compile_args=extra,
        extra_link_args=build_config.link_flags(),
        py_limited_api=False,
    )

    class BuildExtensionRecordingTorch(BuildExtension):
        """Records the torch the library was built against, checked at import (gsq_kernels/_extension.py)."""

        def run(self):
            super().run()
            for ext in self.extensions:
                folder = os.path.dirname(self.get_ext_fullpath(ext.name))
                build_config.write_build_info(folder, with_cuda, reason)

    return [extension], {"build_ext": BuildExtensionRecordingTorch.with_options(use_ninja=True)}


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (gsq_kernels/csrc) so an installed wheel can rebuild the
    extension at import when it meets a different torch."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        import shutil

        target = Path(self.build_lib) / "gsq_kernels" / "csrc"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(ROOT / "csrc", target, ignore=shutil.ignore_patterns("*.o", "*.so"))


ext_modules, cmdclass = make_extension()
cmdclass["build_py"] = BuildPyWithSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)
