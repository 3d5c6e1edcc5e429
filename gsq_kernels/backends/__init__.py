"""The backends: each module defines one Backend and says whether it can run here.

reference (pure_pytorch.py: gsq_kernels/reference.py, any device) | cpu (csrc/cpu, C++/OpenMP) |
cuda (csrc/cuda, CUDA C++) | triton (backends/triton.py)
"""
