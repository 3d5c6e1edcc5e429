"""The reference against docs/spec.md, "Quantizer", written out independently: if the oracle is wrong,
every parity test is meaningless."""

import torch

from gsq_kernels import reference


def _normalize(x, eps):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def test_lookup_is_cosine_nearest_code_on_a_worked_example():
    codebook = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]])
    z = torch.tensor([[5.0, 0.1], [0.1, 2.0], [-1.5, -0.1], [2.0, 2.1], [0.0, -1.0], [0.6, 0.4]])
    # cosine: only directions matter; [0,-1] is orthogonal to codes 0 and 2 -> tie -> 0
    assert reference.nearest_code(z, codebook, 1e-12, True).tolist() == [0, 1, 2, 3, 0, 3]
    # Euclidean on raw vectors: [0.6,0.4] is 0.32 from [1,0] but 0.52 from [1,1]
    assert reference.nearest_code(z, codebook, 1e-12, False).tolist() == [0, 1, 2, 3, 0, 0]


def test_ties_go_to_the_lowest_index():
    codebook = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    z = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    # [1,0], [2,0] and [1,0] have the same direction; a zero vector ties with every code
    assert reference.nearest_code(z, codebook, 1e-12, True).tolist() == [1, 0]


def test_forward_value_and_loss_match_the_formula():
    torch.manual_seed(1)
    z = torch.randn(37, 4, dtype=torch.float64)
    codebook = torch.randn(11, 4, dtype=torch.float64)
    beta = 0.25
    quantized, indices, loss = reference.quantize(z, codebook, beta, 1e-12, True)
    n = _normalize(z, 1e-12)
    c = codebook[indices]
    assert torch.equal(quantized, c)  # the raw code, not re-normalized
    expected = (1 + beta) * ((c - n) ** 2).mean()
    torch.testing.assert_close(loss, expected)


def test_gradients_match_the_straight_through_formulas():
    torch.manual_seed(2)
    eps, beta = 1e-12, 0.25
    z = torch.randn(23, 3, dtype=torch.float64)
    z[5] = 0  # the clamped branch: Jacobian I / eps
    codebook = torch.randn(7, 3, dtype=torch.float64)
    g = torch.randn(23, 3, dtype=torch.float64)
    z_ = z.clone().requires_grad_()
    c_ = codebook.clone().requires_grad_()
    quantized, indices, loss = reference.quantize(z_, c_, beta, eps, True)
    ((quantized * g).sum() + loss).backward()

    m = z.numel()
    norm = z.norm(dim=-1, keepdim=True)
    n = z / norm.clamp_min(eps)
    c = codebook[indices]
    grad_n = g + 2 * beta / m * (n - c)
    u = n
    expected_z = (grad_n - u * (u * grad_n).sum(-1, keepdim=True)) / norm.clamp_min(eps)
    expected_z[5] = grad_n[5] / eps
    expected_c = torch.zeros_like(codebook).index_add_(0, indices, 2 / m * (c - n))
    torch.testing.assert_close(z_.grad, expected_z)
    torch.testing.assert_close(c_.grad, expected_c)


def test_l2_off_passes_gradients_straight_through():
    torch.manual_seed(3)
    z = torch.randn(9, 2, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(5, 2, dtype=torch.float64)
    g = torch.randn(9, 2, dtype=torch.float64)
    quantized, indices, loss = reference.quantize(z, codebook, 0.5, 1e-12, False)
    (quantized * g).sum().backward()
    torch.testing.assert_close(z.grad, g)


def test_reference_ignores_autocast():
    torch.manual_seed(4)
    z = torch.randn(512, 8)
    codebook = torch.randn(4096, 8)
    expected = reference.nearest_code(z, codebook, 1e-12, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = reference.nearest_code(z, codebook, 1e-12, True)
        _, got_q, loss = reference.quantize(z, codebook, 0.25, 1e-12, True)
    assert torch.equal(got, expected)
    assert torch.equal(got_q, expected)
    assert loss.dtype == torch.float32
