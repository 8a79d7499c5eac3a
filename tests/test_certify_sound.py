"""Sound Lipschitz bounds: every layer's bound dominates its true Lipschitz constant."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmrobust.certify.sound import (
    chain_units,
    conv_operator_bound,
    conv_power_iteration,
    sound_lipschitz,
    sound_row_lipschitz,
)
from mmrobust.data.base import ModalitySpec
from mmrobust.errors import ConfigError
from mmrobust.models.encoders import BasicBlock, MLPEncoder, ResNet18, SmallCNN, TemporalCNN


def _dense(module: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """The exact matrix of an affine module's linear part (tiny shapes only)."""
    d = int(torch.tensor(shape).prod())
    eye = torch.eye(d, dtype=torch.float64).view(d, *shape)
    zero = torch.zeros(1, *shape, dtype=torch.float64)
    with torch.no_grad():
        return (module(eye) - module(zero)).flatten(1)


@pytest.mark.parametrize(
    "cin,cout,k,stride,pad,n,dil,groups",
    [(2, 3, 3, 1, 1, 6, 1, 1), (2, 4, 3, 2, 1, 7, 1, 1), (1, 2, 5, 2, 2, 9, 1, 1), (4, 4, 3, 2, 0, 8, 2, 2),
     (3, 2, 7, 2, 3, 10, 1, 1), (1, 2, 3, 3, 0, 7, 1, 1)],
)  # fmt: skip
def test_conv2d_bound_dominates_dense_svd_and_is_tight(cin, cout, k, stride, pad, n, dil, groups):
    torch.manual_seed(cin + k + n)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, groups=groups).double()
    true = float(torch.linalg.matrix_norm(_dense(conv, (cin, n, n)), ord=2))
    bound = conv_operator_bound(conv.weight, (cin, n, n), stride, pad, dil, groups)
    assert bound >= true * (1 - 1e-9)
    assert bound <= 2 * true  # a useful bound, not just a valid one
    # power iteration on the operator itself (true stride/padding) approaches the norm from below
    est = conv_power_iteration(
        lambda x: nn.functional.conv2d(x, conv.weight, None, stride, pad, dil, groups), (cin, n, n)
    )
    assert true * 0.99 <= est <= true * (1 + 1e-9)


@pytest.mark.parametrize("cin,cout,k,stride,pad,n", [(3, 4, 5, 1, 2, 12), (3, 5, 5, 2, 2, 13), (2, 3, 3, 3, 1, 10)])
def test_conv1d_bound_dominates_dense_svd(cin, cout, k, stride, pad, n):
    torch.manual_seed(k + n)
    conv = nn.Conv1d(cin, cout, k, stride=stride, padding=pad).double()
    true = float(torch.linalg.matrix_norm(_dense(conv, (cin, n)), ord=2))
    bound = conv_operator_bound(conv.weight, (cin, n), stride, pad)
    assert true * (1 - 1e-9) <= bound <= 1.5 * true


def test_reshaped_kernel_norm_is_not_a_bound_but_ours_is():
    # the norm of the (cout, cin*k*k) kernel matrix underestimates the operator (here by ~3x)
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(1.0)
    true = float(torch.linalg.matrix_norm(_dense(conv, (1, 8, 8)), ord=2))
    assert float(torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)) < true / 2
    assert conv_operator_bound(conv.weight, (1, 8, 8), 1, 1) >= true


def _bn(c: int, dims: int) -> nn.Module:
    bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(c)
    with torch.no_grad():
        bn.weight.uniform_(-2, 2)
        bn.running_var.uniform_(0.1, 3)
        bn.running_mean.uniform_(-1, 1)
    return bn.eval()


LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (6,)),
    "linear+bn": (lambda: nn.Sequential(nn.Linear(6, 5), _bn(5, 1)), (6,)),
    "conv1d+bn+relu": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3, padding=1, stride=2), _bn(3, 1), nn.ReLU()), (2, 9)),
    "conv2d+bn": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), _bn(3, 2)), (2, 5, 5)),
    "bn alone": (lambda: _bn(3, 2), (3, 4, 4)),
    "maxpool k=s": (lambda: nn.MaxPool2d(2), (2, 6, 6)),
    "maxpool overlapping": (lambda: nn.MaxPool2d(3, 2, 1), (1, 7, 7)),
    "maxpool1d": (lambda: nn.MaxPool1d(3, 1), (2, 8)),
    "avgpool": (lambda: nn.AvgPool2d(3, 1, 1), (2, 5, 5)),
    "adaptive avgpool": (lambda: nn.AdaptiveAvgPool2d((2, 3)), (2, 5, 7)),
    "global avgpool1d": (lambda: nn.AdaptiveAvgPool1d(1), (3, 9)),
    "sigmoid": (lambda: nn.Sigmoid(), (5,)),
    "tanh": (lambda: nn.Tanh(), (5,)),
    "leaky relu": (lambda: nn.LeakyReLU(0.2), (5,)),
    "gelu": (lambda: nn.GELU(), (5,)),
    "basic block": (lambda: BasicBlock(2, 3, 2), (2, 6, 6)),
    "basic block identity": (lambda: BasicBlock(2, 2, 1), (2, 5, 5)),
    "mlp encoder": (lambda: MLPEncoder(ModalitySpec("v", "vector", (7,)), 5, hidden=9), (7,)),
}


def _randomise_bns(module: nn.Module) -> None:
    for mod in module.modules():
        if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
            with torch.no_grad():
                mod.weight.uniform_(-2, 2)
                mod.running_var.uniform_(0.1, 3)


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_bound_dominates_jacobian_norms_and_finite_differences(name):
    torch.manual_seed(0)
    make, shape = LAYERS[name]
    layer = make()
    _randomise_bns(layer)
    layer = layer.double().eval()
    bound = sound_lipschitz(layer, shape)
    worst_jac = worst_fd = 0.0
    for _ in range(8):
        x = torch.randn(1, *shape, dtype=torch.float64) * 2
        jac = torch.autograd.functional.jacobian(lambda t: layer(t).flatten(), x).flatten(1)
        worst_jac = max(worst_jac, float(torch.linalg.matrix_norm(jac, ord=2)))
        for scale in (1e-4, 1e-1, 3.0):
            d = torch.randn_like(x) * scale
            with torch.no_grad():
                worst_fd = max(worst_fd, float((layer(x + d) - layer(x)).norm() / d.norm()))
    assert worst_jac <= bound * (1 + 1e-9), (name, worst_jac, bound)
    assert worst_fd <= bound * (1 + 1e-9), (name, worst_fd, bound)
    assert bound > 0


def test_overlapping_maxpool_bound_is_needed():
    # a 2x2 block where all four windows of a 3/2 pool pick the centre pixel: its change moves 4 outputs
    pool = nn.MaxPool2d(3, 2, 1)
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = 1.0
    d = torch.zeros_like(x)
    d[0, 0, 1, 1] = 0.5
    ratio = float((pool(x + d) - pool(x)).norm() / d.norm())
    assert ratio > 1.0  # so "MaxPool = 1" would be wrong here
    assert sound_lipschitz(pool, (1, 4, 4)) >= ratio


@pytest.mark.parametrize(
    "encoder,spec",
    [
        (TemporalCNN, ModalitySpec("a", "sequence", (3, 12))),
        (SmallCNN, ModalitySpec("i", "image", (1, 12, 12))),
        pytest.param(ResNet18, ModalitySpec("i", "image", (1, 16, 16)), marks=pytest.mark.slow),
    ],
)
def test_encoder_bounds_dominate_finite_differences(encoder, spec):
    torch.manual_seed(1)
    enc = encoder(spec, 8) if encoder is not ResNet18 else encoder(spec)
    _randomise_bns(enc)
    enc.eval()
    bound = sound_lipschitz(enc, spec.shape)
    x = torch.randn(4, *spec.shape)
    with torch.no_grad():
        for scale in (1e-2, 1.0):
            d = torch.randn_like(x) * scale
            ratios = (enc(x + d) - enc(x)).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
            assert float(ratios.max()) <= bound * (1 + 1e-4)


def test_row_bound_is_between_gradient_norms_and_spectral_product():
    torch.manual_seed(2)
    enc = MLPEncoder(ModalitySpec("v", "vector", (6,)), 5, hidden=7).double().eval()
    rows = torch.randn(4, 5, dtype=torch.float64)
    rows[0] = torch.tensor([1.0, 0, 0, 0, 0])  # a sparse row: the componentwise bound helps
    rb = sound_row_lipschitz(enc, (6,), rows).double()
    full = sound_lipschitz(enc, (6,))
    assert (rb <= rows.norm(dim=1) * full * (1 + 1e-6)).all()
    x = torch.randn(500, 6, dtype=torch.float64, requires_grad=True)
    g = torch.stack([torch.autograd.grad((enc(x) @ r).sum(), x)[0].norm(dim=1).max() for r in rows])
    assert (g <= rb * (1 + 1e-6)).all()


def test_row_bound_is_exact_for_a_linear_encoder():
    lin = nn.Sequential(nn.Flatten(), nn.Linear(6, 4)).double()
    rows = torch.randn(3, 4, dtype=torch.float64)
    exact = (rows @ lin[1].weight).norm(dim=1)
    assert torch.allclose(sound_row_lipschitz(lin, (6,), rows).double(), exact, rtol=1e-5)


def test_conv_then_bn_is_fused_into_one_tighter_unit():
    seq = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), _bn(3, 1)).eval()
    units = chain_units(seq, (2, 8))
    assert len(units) == 1 and units[0].name.endswith("+bn")
    separate = chain_units(nn.Sequential(seq[0]), (2, 8))[0].lip * float(
        (seq[1].weight.detach() / torch.sqrt(seq[1].running_var + seq[1].eps)).abs().max()
    )
    assert units[0].lip <= separate * (1 + 1e-6)


def test_unknown_layer_is_a_clear_error():
    class Weird(nn.Module):
        def forward(self, x):
            return torch.sin(x)

    with pytest.raises(
        ConfigError,
        match=r"the sound Lipschitz bound does not support node 'sin' \(call_function "
        r"torch.sin\) in Sequential.forward; use certifier='empirical', or register a rule for it with "
        r"mmrobust.layer_rules.register_function\(torch.sin, lipschitz=...\)$",
    ):
        sound_lipschitz(nn.Sequential(nn.Linear(3, 3), Weird()), (3,))
