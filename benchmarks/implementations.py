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

Lookup: where gsq_kernels' functions take a `lookup` keyword ("exact", the nearest code, or "dot",
the fp32 dot product), `lookup_modes` names both and `make_case` passes the one asked for; with an
older gsq_kernels the keyword is left out and the case is labelled with no lookup (None).
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable

import torch

from .shapes import Setting

MODES = ("lookup", "forward", "forward_backward")
GSQ_BACKENDS = ("cpu", "cuda", "triton")
GSQ_IMPLEMENTATIONS = ("reference", "reference-compiled", *GSQ_BACKENDS)
LOOKUP_MODES = ("exact", "dot")


def _entry_point(mode: str):
    import gsq_kernels

    return gsq_kernels.nearest_code_indices if mode == "lookup" else gsq_kernels.grouped_spherical_quantize


def default_lookup(mode: str = "forward") -> str | None:
    """The lookup gsq_kernels uses when none is passed (None if it has no `lookup` keyword)."""
    parameter = inspect.signature(_entry_point(mode)).parameters.get("lookup")
    return None if parameter is None else parameter.default


def lookup_modes(implementation: str, mode: str) -> tuple[str | None, ...]:
    """The lookup= values worth timing for a case: the default first, then the other mode; (None,)
    for the peers and for a gsq_kernels without the keyword."""
    default = default_lookup(mode) if implementation in GSQ_IMPLEMENTATIONS else None
    if default is None:
        return (None,)
    return (default, *(m for m in LOOKUP_MODES if m != default))


def label(implementation: str, lookup: str | None) -> str:
    """How tables name a case: the implementation, with its lookup mode when one was passed."""
    return implementation if lookup is None else f"{implementation}:{lookup}"


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


def make_case(
    implementation: str, mode: str, setting: Setting, device: str, lookup: str | None = None, synchronize: bool = True
) -> Callable[[], object]:
    """One call of `implementation` in `mode` on a random latent of `setting` (seed 0), with
    lookup=`lookup` when given; synchronize=False leaves a CUDA call asynchronous (for timing
    with CUDA events)."""
    from gsq_kernels import reference, spherical_init

    generator = torch.Generator().manual_seed(0)
    z = torch.randn(setting.latent_shape(), generator=generator).to(device)
    codebook = spherical_init(setting.codebook_size, setting.code_dim, generator=generator).to(device)
    if implementation in GSQ_IMPLEMENTATIONS:
        return gsq_case(implementation, mode, z, codebook, setting.groups, lookup, synchronize)
    if lookup is not None:
        raise ValueError(f"lookup={lookup!r} applies to gsq_kernels' implementations, not to {implementation!r}")
    sync = _synchronized if synchronize else (lambda fn, device: fn)

    if implementation == "vqtorch":
        from vector_quantize_pytorch import VectorQuantize

        vq = VectorQuantize(
            dim=setting.channels,
            codebook_size=setting.codebook_size,
            heads=setting.groups,
            codebook_dim=setting.code_dim,
            separate_codebook_per_head=False,
            use_cosine_sim=True,
            accept_image_fmap=True,
            commitment_weight=0.25,
            rotation_trick=False,
        ).to(device)
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

        return sync(run, device)

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

        return sync(run, device)

    raise ValueError(f"unknown implementation {implementation!r}")


def gsq_case(
    implementation: str,
    mode: str,
    z: torch.Tensor,
    codebook: torch.Tensor,
    groups: int,
    lookup: str | None = None,
    synchronize: bool = True,
) -> Callable[[], object]:
    """make_case for gsq_kernels' own implementations on a given latent and codebook."""
    backend = "reference" if implementation.startswith("reference") else implementation
    entry_point = _entry_point(mode)
    options = {"backend": backend, "check_finite": False}
    if lookup is not None:
        if "lookup" not in inspect.signature(entry_point).parameters:
            raise ValueError(f"this gsq_kernels has no lookup= keyword (asked for lookup={lookup!r})")
        options["lookup"] = lookup
    if mode == "lookup":

        def run():
            return entry_point(z, codebook, groups, **options)
    elif mode == "forward":

        def run():
            with torch.no_grad():
                return entry_point(z, codebook, groups, **options)
    elif mode == "forward_backward":
        z.requires_grad_()
        codebook.requires_grad_()

        def run():
            out = entry_point(z, codebook, groups, **options)
            (out.quantized.sum() + out.loss).backward()
            z.grad = None
            codebook.grad = None
            return out.indices
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if implementation == "reference-compiled":
        run = torch.compile(run, dynamic=False)
    return _synchronized(run, z.device.type) if synchronize else run
