"""The fused fake-quantizer against the composed autograd graph it replaces, bit for bit.

`P.fake_quantize` (one custom autograd node) must give exactly the values and the gradients
(x, scale, zero point) of `P.fake_quantize_composed` (clamp(round_ste(x / s) + z) - z) * s,
including round-half-to-even ties, values on and beyond the clamp limits (where autograd's
clamp passes no gradient), and the rounding of the LSQ scale-gradient sums. "Equal" here means
equal bit patterns, not allclose.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from qcli.quant import primitives as P
from qcli.quant.quantizer import Quantizer
from qcli.quant.spec import QuantSpec

SPECS = [
    QuantSpec(bits, signed, symmetric, per_channel)
    for bits in (2, 4, 8)
    for signed, symmetric in ((True, True), (True, False), (False, False))
    for per_channel in (False, True)
] + [QuantSpec(8, True, True, per_channel, limit=64) for per_channel in (False, True)]


def spec_id(s: QuantSpec) -> str:
    kind = ("int" if s.signed else "uint") + str(s.bits)
    sym = "sym" if s.symmetric else "asym"
    gran = "pc" if s.per_channel else "pt"
    return f"{kind}-{sym}-{gran}" + (f"-lim{s.limit}" if s.limit else "")


def same_bits(a: Tensor | None, b: Tensor | None) -> bool:
    """Identical shape and bit patterns (so -0.0 != 0.0); NaNs only need to be NaN in both."""
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    ints = {torch.float32: torch.int32, torch.float64: torch.int64}.get(a.dtype, torch.int16)
    return torch.equal(a[~nan].view(ints), b[~nan].view(ints))


def grid_params(spec: QuantSpec, channels: int, seed: int) -> tuple[Tensor, Tensor]:
    """Scales (a power of two on channel 0, so exact ties exist, odd values elsewhere) and
    integer zero points inside the grid (0 for symmetric grids)."""
    g = torch.Generator().manual_seed(seed)
    n = channels if spec.per_channel else 1
    scale = 0.01 + 0.2 * torch.rand(n, generator=g)
    scale[0] = 2.0**-4
    if spec.symmetric:
        zp = torch.zeros(n)
    else:
        zp = torch.randint(spec.qmin, spec.qmax + 1, (n,), generator=g).float()
        zp[0] = (spec.qmin + spec.qmax + 1) // 2
    if not spec.per_channel:
        return scale[0].clone(), zp[0].clone()
    return scale, zp


def probe_inputs(spec: QuantSpec, scale: Tensor, zp: Tensor, shape: tuple[int, ...], seed: int):
    """Random values over and beyond the grid, then, per channel: every tie k + 0.5 of the
    grid and a few beyond it (positive and negative), both limits exactly, one step past
    them, far outside, and signed zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(shape)
    channels = shape[0]
    for c in range(channels):
        s = scale[c] if scale.ndim else scale
        z = zp[c] if zp.ndim else zp
        lo, hi = (spec.qmin - z) * s, (spec.qmax - z) * s
        row = x[c].view(-1)
        span = float(hi - lo)
        row.copy_(float(lo) - 0.25 * span + 1.5 * span * torch.rand(row.numel(), generator=g))
        ks = torch.arange(spec.qmin - 3, spec.qmax + 3, dtype=torch.float32) - z
        special = torch.cat(
            [
                (ks + 0.5) * s,  # ties, x / s = k + 0.5 (exact when s is a power of two)
                (ks - 0.5) * s,
                torch.stack([lo, hi, lo - s, hi + s, lo * 1e3 - 1, hi * 1e3 + 1]),
                torch.tensor([0.0, -0.0, 1e-30, -1e-30]),
            ]
        )
        m = min(special.numel(), row.numel())
        row[:m] = special[:m]
    return x


def run(fq, x, scale, zp, qmin, qmax, axis, keep=None, grad=None, zero_point_grad=False):
    x = x.clone().requires_grad_(True)
    scale = scale.clone().requires_grad_(True)
    zp = zp.clone().requires_grad_(zero_point_grad)
    y = fq(x, scale, zp, qmin, qmax, axis, keep=keep)
    if grad is None:
        y.sum().backward()
    else:
        y.backward(grad)
    return y.detach(), x.grad, scale.grad, zp.grad, y.grad_fn


def assert_same(x, scale, zp, qmin, qmax, axis, **kw) -> None:
    got = run(P.fake_quantize, x, scale, zp, qmin, qmax, axis, **kw)
    ref = run(P.fake_quantize_composed, x, scale, zp, qmin, qmax, axis, **kw)
    assert "FakeQuantize" in type(got[-1]).__name__, "the fused node was not used"
    for name, a, b in zip(("values", "dx", "dscale", "dzero_point"), got, ref, strict=False):
        assert same_bits(a, b), f"{name} differ from the composed graph"


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("upstream", ["sum", "random"])
def test_fused_equals_composed(spec: QuantSpec, upstream: str):
    shape = (4, 3, 9, 11)
    scale, zp = grid_params(spec, shape[0], seed=spec.bits)
    x = probe_inputs(spec, scale, zp, shape, seed=1)
    grad = (
        None
        if upstream == "sum"
        else torch.randn(shape, generator=torch.Generator().manual_seed(2))
    )
    axis = 0 if spec.per_channel else None
    assert_same(x, scale, zp, spec.qmin, spec.qmax, axis, grad=grad)


def test_probes_cover_ties_and_limits():
    """The inputs above really hold exact ties and exact limits (else the test proves less)."""
    spec = QuantSpec(4, True, False, False)
    scale, zp = grid_params(spec, 1, seed=4)
    x = probe_inputs(spec, scale, zp, (1, 64), seed=1)
    u = x / scale + zp
    assert (u - u.floor() == 0.5).sum() >= 10
    assert (u == spec.qmin).any() and (u == spec.qmax).any()
    # and the composed graph gives no gradient exactly at the limits, which the fused node
    # must reproduce (an inclusive mask would fail test_fused_equals_composed)
    xg = x.clone().requires_grad_(True)
    P.fake_quantize_composed(xg, scale, zp, spec.qmin, spec.qmax).sum().backward()
    on_limit = (u == spec.qmin) | (u == spec.qmax)
    assert (xg.grad[on_limit] == 0).all()


def test_true_division_not_reciprocal():
    """x / s and x * (1 / s) land on different sides of a tie here; QuantizeLinear divides."""
    s = torch.tensor(0.3)
    x = torch.tensor(-92.5) * s  # float32: x / s is exactly -92.5, x * (1 / s) is not
    assert float(torch.round(x * (1 / s))) == -93.0  # the example discriminates
    assert float(torch.round(x / s)) == -92.0  # half to even
    y = P.fake_quantize(x, s, torch.tensor(0.0), -128, 127)
    assert same_bits(y, torch.tensor(-92.0) * s)
    # the same kind of case in bulk, gradients included, over many scales
    ks = torch.arange(-120, 120, dtype=torch.float32) + 0.5
    for sv in (0.3, 0.7, 0.013, 0.029):
        s = torch.tensor(sv)
        x = ks * s
        assert (torch.round(x / s) != torch.round(x * (1 / s))).any()
        assert_same(x, s, torch.tensor(0.0), -128, 127, None, grad=torch.randn_like(x))


@pytest.mark.parametrize(
    "spec", [SPECS[-2], SPECS[-1], QuantSpec(4, False, False, False)], ids=spec_id
)
def test_fused_qdrop_mask(spec: QuantSpec):
    shape = (4, 3, 9, 11)
    scale, zp = grid_params(spec, shape[0], seed=3)
    x = probe_inputs(spec, scale, zp, shape, seed=5)
    keep = P.random_mask(shape, 0.5, generator=torch.Generator().manual_seed(0))
    axis = 0 if spec.per_channel else None
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    grad.view(-1)[::7] = -0.0  # autograd's where/add turn some of these into +0.0
    assert_same(x, scale, zp, spec.qmin, spec.qmax, axis, keep=keep, grad=grad)
    assert_same(x, scale, zp, spec.qmin, spec.qmax, axis, keep=keep)


def test_zero_point_gradient():
    spec = QuantSpec(4, False, False, True)
    scale, zp = grid_params(spec, 4, seed=7)
    x = probe_inputs(spec, scale, zp, (4, 50), seed=8)
    assert_same(x, scale, zp, spec.qmin, spec.qmax, 0, zero_point_grad=True)
    assert_same(x, scale[0], zp[0], spec.qmin, spec.qmax, None, zero_point_grad=True)


@pytest.fixture
def fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts backward passes that fell back to autograd through the composed graph."""
    calls: list[int] = []
    composed = P._composed_grads

    def counted(*args, **kwargs):
        calls.append(1)
        return composed(*args, **kwargs)

    monkeypatch.setattr(P, "_composed_grads", counted)
    return calls


def test_other_axes_and_dtypes(fallbacks: list[int]):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 5, 6, 7, generator=g) * 2
    scale, zp = torch.rand(5, generator=g) * 0.1 + 0.01, torch.full((5,), 3.0)
    grad = torch.randn(x.shape, generator=g)
    assert_same(x, scale, zp, 0, 15, 1)  # per-channel along axis 1
    assert_same(x.double(), scale.double(), zp.double(), 0, 15, 1)
    for dtype in (torch.float16, torch.bfloat16):
        assert_same(x.to(dtype), scale.to(dtype), zp.to(dtype), 0, 15, 1, grad=grad.to(dtype))
    assert not fallbacks


@pytest.mark.parametrize("pieces", [False, True])
def test_channels_last_takes_the_fast_path(
    pieces: bool, fallbacks: list[int], monkeypatch: pytest.MonkeyPatch
):
    """A channels_last activation (what BN tuning and data generation run on a CPU) with its
    gradient and QDrop mask in the same layout: no fallback, same bits."""
    if pieces:
        monkeypatch.setattr(P, "PIECE", 500)
        monkeypatch.setattr(P, "_piecewise", lambda: True)
    g = torch.Generator().manual_seed(16)
    cl = torch.channels_last
    x = (torch.randn(4, 6, 9, 7, generator=g) * 2).contiguous(memory_format=cl)
    grad = torch.randn(x.shape, generator=g).contiguous(memory_format=cl)
    keep = P.random_mask_like(x, 0.4, generator=g)
    assert keep.is_contiguous(memory_format=cl)
    scale, zp = torch.rand(6, generator=g) * 0.1 + 0.01, torch.full((6,), 3.0)
    wscale = torch.rand(4, generator=g) * 0.1 + 0.01
    assert_same(x, scale[0], zp[0], 0, 15, None)  # broadcast-scalar gradient
    assert_same(x, scale[0], zp[0], 0, 15, None, grad=grad, keep=keep)
    assert_same(x, scale, zp, 0, 15, 1, grad=grad, keep=keep)
    assert_same(x, wscale, torch.zeros(4), -8, 7, 0, grad=grad)  # a channels_last weight
    assert_same(x, wscale, torch.zeros(4), -8, 7, 0, zero_point_grad=True)
    assert not fallbacks


def test_mixed_layouts_fall_back_exactly(fallbacks: list[int]):
    g = torch.Generator().manual_seed(17)
    x = torch.randn(2, 5, 6, 7, generator=g) * 2
    xc = x.contiguous(memory_format=torch.channels_last)
    scale, zp = torch.rand(5, generator=g) * 0.1 + 0.01, torch.full((5,), 3.0)
    grad = torch.randn(x.shape, generator=g)
    assert_same(xc, scale[0], zp[0], 0, 15, None, grad=grad)
    assert_same(x, scale, zp, 0, 15, 1, grad=grad.contiguous(memory_format=torch.channels_last))
    keep = P.random_mask(x.shape, 0.5, generator=g)  # contiguous, x channels_last
    assert_same(xc, scale, zp, 0, 15, 1, grad=grad, keep=keep)
    assert len(fallbacks) == 3


def test_infinities_and_nans_match():
    """round_ste turns an infinite x / s into NaN (inf - inf); the fused node does too."""
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), 3e38, -3e38, 1.0, 0.0])
    for s in (torch.tensor(0.1), torch.tensor(1e-8)):
        assert_same(x, s, torch.tensor(5.0), 0, 15, None, grad=torch.ones(7))


def test_pieces_match_whole(monkeypatch: pytest.MonkeyPatch):
    """Large CPU tensors are processed in cache-sized pieces: same bits as one piece."""
    monkeypatch.setattr(P, "PIECE", 1000)
    monkeypatch.setattr(P, "_piecewise", lambda: True)
    g = torch.Generator().manual_seed(10)
    for spec in (QuantSpec(4, False, False, False), QuantSpec(8, True, True, True, limit=64)):
        shape = (6, 5, 17, 19)  # 9,690 elements: ten pieces, rows split unevenly
        scale, zp = grid_params(spec, shape[0], seed=11)
        x = probe_inputs(spec, scale, zp, shape, seed=12)
        axis = 0 if spec.per_channel else None
        assert len(P._pieces(x, *(t.reshape(-1, 1, 1, 1) for t in (scale, zp)))) > 1
        keep = P.random_mask(shape, 0.3, generator=g)
        grad = torch.randn(shape, generator=g)
        assert_same(x, scale, zp, spec.qmin, spec.qmax, axis, grad=grad)
        assert_same(x, scale, zp, spec.qmin, spec.qmax, axis, keep=keep, grad=grad)
        assert_same(x, scale, zp, spec.qmin, spec.qmax, axis, keep=keep, zero_point_grad=True)


def test_no_grad_forward_matches():
    spec = QuantSpec(8, False, False, False)
    scale, zp = grid_params(spec, 1, seed=13)
    x = probe_inputs(spec, scale, zp, (3, 1000), seed=14)
    with torch.no_grad():
        a = P.fake_quantize(x, scale, zp, spec.qmin, spec.qmax)
    b = P.fake_quantize_composed(x, scale, zp, spec.qmin, spec.qmax)
    assert same_bits(a, b.detach())


def test_quantizer_fused_and_composed_agree():
    q = Quantizer(QuantSpec(4, False, False, False))
    q.set_qparams(torch.tensor(0.07), torch.tensor(5.0))
    q.scale.requires_grad_(True)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(15))
    out = []
    for fused in (True, False):
        q.fused = fused
        q.scale.grad = None
        xg = x.clone().requires_grad_(True)
        y = q(xg)
        y.backward(torch.ones_like(y) * 0.3)
        out.append((y.detach(), xg.grad, q.scale.grad))
    for a, b in zip(*out, strict=True):
        assert same_bits(a, b)


def test_random_mask():
    g = torch.Generator().manual_seed(0)
    m = P.random_mask((200, 1000), 0.3, generator=g)
    assert m.dtype == torch.bool and m.shape == (200, 1000)
    assert abs(m.float().mean().item() - 0.3) < 0.005
    again = P.random_mask((200, 1000), 0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m, again)  # seeded: the same mask twice
    assert not torch.equal(m, P.random_mask((200, 1000), 0.3, generator=g))
    assert P.random_mask((3, 5), 0.0).sum() == 0 and P.random_mask((3, 5), 1.0).all()
    assert P.random_mask((7,), 0.5).shape == (7,)  # not a multiple of four
