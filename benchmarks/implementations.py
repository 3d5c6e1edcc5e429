"""Every implementation the benchmarks compare, as `make_case(implementation, mode, setting, device)`
returning a zero-argument callable that runs one call (synchronized on CUDA).

Implementations:
  reference           gsq_kernels' pure-PyTorch reference (forms the M x V similarity matrix)
  reference-compiled  torch.compile of the same reference (what `torch.compile` buys users)
  cpu / cuda / triton gsq_kernels' fused backends
  vqtorch             vector-quantize-pytorch's VectorQuantize, as close to GSQ as it allows:
                      heads=G with one shared codebook (separate_codebook_per_head=False),
                      codebook_dim=d, use_cosine_sim=True (l2-normalized lookup), commitment 0.25.
                      Differences: its codebook is updated by EMA (cosine similarity is incompatible
                      with its learnable_codebook mode), so its backward carries no codebook gradient
                      and its forward also runs the EMA update; it returns l2-normalized codes.
  faiss               FAISS IndexFlatIP, k=1, on l2-normalized vectors: the exact cosine lookup
                      alone (the index is built once; normalizing the queries is timed).
Modes: lookup (indices only), forward (quantize, no autograd), forward_backward (quantize, then
backward of quantized.sum() + loss).
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch

from .shapes import Setting

MODES = ("lookup", "forward", "forward_backward")
GSQ_BACKENDS = ("cpu", "cuda", "triton")


def peer_missing(implementation: str) -> str | None:
    """Why a peer cannot run here (None if it can)."""
    module = {"vqtorch": "vector_quantize_pytorch", "faiss": "faiss"}.get(implementation)
    if module and importlib.util.find_spec(module) is None:
        extra = "pip install -e .[bench]"
        return f"{module} is not installed ({extra})"
    return None


def supports(implementation: str, mode: str, device: str) -> str | None:
    """None if the implementation runs this mode on this device, else why not."""
    import gsq_kernels

    if implementation in GSQ_BACKENDS:
        if implementation not in gsq_kernels.available_backends(device):
            return f"gsq_kernels backend {implementation!r} is not available on {device}"
        return None
    if implementation in ("reference", "reference-compiled"):
        return None
    missing = peer_missing(implementation)
    if missing:
        return missing
    if implementation == "vqtorch" and mode == "lookup":
        return "vector-quantize-pytorch has no lookup-only entry point"
    if implementation == "faiss":
        if mode != "lookup":
            return "FAISS only searches (no quantizer forward/backward)"
        if device == "cuda":
            import faiss

            if not hasattr(faiss, "StandardGpuResources"):
                return "faiss-gpu is not installed"
    return None


def _synchronized(fn: Callable[[], object], device: str) -> Callable[[], object]:
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def make_case(implementation: str, mode: str, setting: Setting, device: str) -> Callable[[], object]:
    from gsq_kernels import grouped_spherical_quantize, nearest_code_indices, reference, spherical_init

    generator = torch.Generator().manual_seed(0)
    z = torch.randn(setting.latent_shape(), generator=generator).to(device)
    codebook = spherical_init(setting.codebook_size, setting.code_dim, generator=generator).to(device)
    groups = setting.groups

    if implementation in ("reference", "reference-compiled", *GSQ_BACKENDS):
        backend = "reference" if implementation.startswith("reference") else implementation
        if mode == "lookup":
            def run():
                return nearest_code_indices(z, codebook, groups, backend=backend, check_finite=False)
        elif mode == "forward":
            def run():
                with torch.no_grad():
                    return grouped_spherical_quantize(z, codebook, groups, backend=backend, check_finite=False)
        else:
            z.requires_grad_()
            codebook.requires_grad_()

            def run():
                out = grouped_spherical_quantize(z, codebook, groups, backend=backend, check_finite=False)
                (out.quantized.sum() + out.loss).backward()
                z.grad = None
                codebook.grad = None
                return out.indices
        if implementation == "reference-compiled":
            run = torch.compile(run, dynamic=False)
        return _synchronized(run, device)

    if implementation == "vqtorch":
        from vector_quantize_pytorch import VectorQuantize

        vq = VectorQuantize(dim=setting.channels, codebook_size=setting.codebook_size, heads=groups,
                            codebook_dim=setting.code_dim, separate_codebook_per_head=False, use_cosine_sim=True,
                            accept_image_fmap=True, commitment_weight=0.25, rotation_trick=False).to(device)
        if mode == "forward":
            vq.eval()

            def run():
                with torch.no_grad():
                    return vq(z)
        else:
            z.requires_grad_()
            vq.train()

            def run():
                quantized, indices, loss = vq(z)
                (quantized.sum() + loss.sum()).backward()
                z.grad = None
                return indices
        return _synchronized(run, device)

    if implementation == "faiss":
        import faiss

        index = faiss.IndexFlatIP(setting.code_dim)
        index.add(reference.l2(codebook.float(), 1e-12).cpu().numpy())
        if device == "cuda":
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        rows = z.permute(0, 2, 3, 1).reshape(-1, setting.code_dim)

        def run():
            queries = reference.l2(rows, 1e-12).contiguous()
            _, indices = index.search(queries.cpu().numpy(), 1)
            return indices

        return _synchronized(run, device)

    raise ValueError(f"unknown implementation {implementation!r}")
