// The extension's torch glue as one translation unit. Every file that includes torch headers is
// #included here instead of being compiled on its own (gsq_kernels/_build_config.py: TORCH_GLUE):
// torch's headers cost ~10 s of compiler time per unit, more than the kernels themselves, so
// parsing them once instead of three times saves ~15 s of CPU time per build.
// The included files must stay compilable together: keep their file-local helpers inside their own
// namespaces (gsq_cpu, gsq_cuda) and name no global statics alike.

// The op schemas first, then each backend's kernels for them.
#include "gsq_ops.cpp"

// Their gradient, for every device.
#include "gsq_autograd.cpp"

#include "cpu/gsq_cpu.cpp"
#ifdef GSQ_WITH_CUDA
#include "cuda/gsq_cuda.cpp"
#endif
