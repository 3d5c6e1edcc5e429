"""torch.autograd.gradcheck in float64 on the fused backward.

The straight-through estimator is not the derivative of the forward value (a codebook row does not
move when z moves a little), so gradcheck cannot be pointed at the op directly. Instead each call
returns  op(z, C) - sg(op(z, C)) + sg(S(z, C)):  its value is S's, so the numerical Jacobian is
S's derivative, while its analytical Jacobian is the op's backward. S is the smooth function whose
true derivative the straight-through estimator defines (docs/spec.md, "Gradients"), with the indices and the
stop-gradient operands frozen at the point being checked:
    S(z, C) = <W, l2(z)> + k * [ beta * mean((c0 - l2(z))^2) + mean((C[idx0] - n0)^2) ]
gradcheck passes only if the backward equals S's numerical derivative everywhere.
"""

import pytest
import torch

from gsq_kernels import grouped_spherical_quantize, reference
from parity import backends_for, separated_latent


def _backends_with_float64():
    pairs = [("cpu", b) for b in ["reference"] + backends_for("cpu")]
    if torch.cuda.is_available():
        pairs += [("cuda", b) for b in backends_for("cuda")]
    return [(device, b) for device, b in pairs if b != "triton"]  # Triton runs in float32 (its own tests)


@pytest.mark.parametrize("device,backend", _backends_with_float64(), ids=str)
@pytest.mark.parametrize("l2_normalize", [True, False], ids=["l2", "raw"])
@pytest.mark.parametrize("d,groups", [(1, 3), (3, 2), (4, 1), (16, 1)])
def test_gradcheck(device, backend, l2_normalize, d, groups):
    beta, loss_weight, eps = 0.25, 3.0, 1e-12
    codebook0 = torch.randn(7, d, dtype=torch.float64)
    # A wide gap: gradcheck's 1e-6 perturbations must not change any index.
    z0 = separated_latent((2, 3, groups * d), groups, codebook0, torch.float64, l2_normalize=l2_normalize, min_gap=1e-3)
    weights = torch.randn(z0.shape, dtype=torch.float64)
    rows0 = z0.reshape(-1, d)
    idx0 = reference.nearest_code(rows0, codebook0, eps, l2_normalize)
    n0 = reference.l2(rows0, eps) if l2_normalize else rows0
    c0 = codebook0[idx0]

    def smooth_surrogate(z, codebook):
        rows = z.reshape(-1, d)
        n = reference.l2(rows, eps) if l2_normalize else rows
        commitment = beta * ((c0 - n) ** 2).mean()
        codebook_term = ((codebook[idx0] - n0) ** 2).mean()
        return (weights.reshape(-1, d) * n).sum() + loss_weight * (commitment + codebook_term)

    def checked(z, codebook):
        out = grouped_spherical_quantize(
            z, codebook, groups, beta=beta, l2_normalize=l2_normalize, eps=eps, backend=backend
        )
        assert torch.equal(out.indices.reshape(-1).cpu(), idx0)
        op_value = (weights.to(z.device) * out.quantized).sum() + loss_weight * out.loss
        return op_value - op_value.detach() + smooth_surrogate(z.cpu(), codebook.cpu()).detach().to(z.device)

    def checked_on_device(z, codebook):
        return checked(z.to(device), codebook.to(device)).cpu()

    z = z0.clone().requires_grad_()
    codebook = codebook0.clone().requires_grad_()
    assert torch.autograd.gradcheck(checked_on_device, (z, codebook), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_catches_a_wrong_backward():
    """The construction above must fail for a backward that is off (here: commitment doubled)."""
    d, beta, eps = 3, 0.25, 1e-12
    codebook0 = torch.randn(5, d, dtype=torch.float64)
    z0 = separated_latent((4, d), 1, codebook0, torch.float64, min_gap=1e-3)
    idx0 = reference.nearest_code(z0, codebook0, eps, True)
    c0 = codebook0[idx0]

    def checked(z):
        quantized, _, loss = reference.quantize(z, codebook0, 2 * beta, eps, True)  # wrong beta
        surrogate = beta * ((c0 - reference.l2(z, eps)) ** 2).mean()
        return loss - loss.detach() + surrogate.detach() + 0 * quantized.sum()

    z = z0.clone().requires_grad_()
    assert not torch.autograd.gradcheck(checked, (z,), eps=1e-6, atol=1e-7, rtol=1e-5, raise_exception=False)
