"""Layer taps, layer selection and hook ownership."""

from __future__ import annotations

import pytest
import torch
from conftest import rows_in, rows_out
from torch import nn
from torch.testing import assert_close

import canonreg
from canonreg import CanonRegError
from canonreg.layers import HookSet, all_reduce_flat, claim_model, release_model, select_layers
from canonreg.taps import (
    ConvTap,
    EmbeddingTap,
    LinearTap,
    TransposedLinearTap,
    default_taps,
    functional_only_children,
    get_tap,
    matrix_view,
    register_tap,
    tap_batch_size,
    to_weight_layout,
    untapped_reason,
    weight_matrix,
    weight_parameter,
)

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel"),
]


def _call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


CONVS = [
    lambda: nn.Conv1d(3, 4, 3),
    lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2),
    lambda: nn.Conv1d(3, 4, 4, padding="same"),  # even kernel: PyTorch pads one more on the right
    lambda: nn.Conv1d(3, 4, 2, padding="same", dilation=3),
    lambda: nn.Conv1d(3, 4, 3, padding="valid"),
    lambda: nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular"),
    lambda: nn.Conv1d(3, 4, 3, padding=2, padding_mode="reflect"),
    lambda: nn.Conv1d(3, 4, 3, padding=1, padding_mode="replicate", bias=False),
    lambda: nn.Conv2d(3, 4, 3),
    lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
    lambda: nn.Conv2d(3, 4, (2, 4), padding="same"),
    lambda: nn.Conv2d(3, 4, 3, padding="same", padding_mode="circular"),
    lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect", bias=False),
]


@pytest.mark.parametrize("make", CONVS, ids=[f"conv{i}" for i in range(len(CONVS))])
def test_conv_tap_rows_satisfy_affine_identity_and_match_explicit_patches(make) -> None:
    torch.manual_seed(0)
    conv = make().double()
    shape = (2, 3, 9) if isinstance(conv, nn.Conv1d) else (2, 3, 7, 8)
    x = torch.randn(*shape, dtype=torch.float64)
    y = conv(x)
    tap = ConvTap()
    ha = tap.input_rows(conv, (x,))
    hb = tap.output_rows(conv, y)
    w = tap.weight(conv)
    assert w.shape == (conv.out_channels, ha.shape[1])
    # h_b = W h_a + b per output position, exactly
    assert_close(hb, ha @ w.T + (conv.bias if conv.bias is not None else 0))
    # and the rows are the patches an explicit loop over positions extracts (same order)
    assert_close(ha, rows_in(conv, x))
    assert_close(hb, rows_out(conv, y))
    assert tap_batch_size(tap, conv, (x,)) == 2


@pytest.mark.parametrize("make", [CONVS[1], CONVS[9]], ids=["conv1d", "conv2d"])
def test_conv_tap_unbatched_input(make) -> None:
    conv = make().double()
    shape = (3, 9) if isinstance(conv, nn.Conv1d) else (3, 7, 8)
    x = torch.randn(*shape, dtype=torch.float64)
    tap = ConvTap()
    assert_close(tap.input_rows(conv, (x,)), tap.input_rows(conv, (x.unsqueeze(0),)))
    assert_close(tap.output_rows(conv, conv(x)), tap.output_rows(conv, conv(x.unsqueeze(0))))
    assert tap.batch_size(conv, (x,)) == 1


def test_linear_tap_any_leading_dims() -> None:
    lin = nn.Linear(4, 3).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    tap = LinearTap()
    ha, hb = tap.input_rows(lin, (x,)), tap.output_rows(lin, lin(x))
    assert ha.shape == (10, 4) and hb.shape == (10, 3)
    assert_close(hb, ha @ tap.weight(lin).T + tap.bias(lin))
    assert tap.batch_size(lin, (x,)) == 2
    assert tap.batch_size(lin, (x[0, 0],)) == 1  # unbatched 1-D input
    with pytest.raises(CanonRegError, match="non-tensor"):
        tap.input_rows(lin, ("text",))


def test_grouped_conv_is_rejected_clearly() -> None:
    conv = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(CanonRegError, match=r"'g' is a grouped convolution \(groups=2\).*groups=1"):
        ConvTap().check(conv, "g")
    # layers=None: grouped and depthwise convs are excluded with the reason, not an error
    model = nn.Sequential(conv, nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 2, 1))
    chosen, _, excluded = select_layers(model, None)
    assert list(chosen) == ["2"]
    assert "grouped convolution (groups=2)" in excluded["0"] and "grouped convolution (groups=4)" in excluded["1"]
    assert list(select_layers(model, nn.Conv2d)[2]) == ["0", "1"]  # a type filter excludes them too
    with pytest.raises(CanonRegError, match=r"grouped convolution \(groups=2\)"):
        select_layers(model, ["0", "2"])  # asked for by name: the clear error
    with pytest.raises(ValueError, match=r"matched none.*excluded '0': .*grouped"):
        select_layers(nn.Sequential(conv), None)  # nothing left: the reasons are in the message
    with pytest.raises(CanonRegError, match="ConvTap"):
        ConvTap().check(nn.Linear(2, 2), "lin")


def test_registry_resolution_and_registration() -> None:
    class MyLinear(nn.Linear):
        pass

    class Odd(nn.Module):
        pass

    assert isinstance(get_tap(MyLinear(2, 2)), LinearTap)  # nearest registered base class
    assert get_tap(Odd()) is None
    assert set(default_taps()) >= {nn.Linear, nn.Conv1d, nn.Conv2d}
    with pytest.raises(TypeError, match="`module_type`"):
        register_tap(int, LinearTap())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="missing `check`"):
        register_tap(Odd, object())  # type: ignore[arg-type]
    local = {Odd: LinearTap()}
    assert get_tap(Odd(), local) is local[Odd]
    assert get_tap(Odd()) is None  # local taps do not leak into the registry
    assert canonreg.register_tap is register_tap


def test_functional_only_children() -> None:
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 2))
    found = functional_only_children(model)
    assert list(found) == ["0.out_proj"]
    assert functional_only_children(nn.MultiheadAttention(8, 2)) == {
        "out_proj": functional_only_children(nn.MultiheadAttention(8, 2))["out_proj"]
    }


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Conv1d(1, 2, 3), nn.Linear(2, 2)))


def test_select_layers_all_forms() -> None:
    model = _net()
    chosen, taps, excluded = select_layers(model, None)
    assert list(chosen) == ["0", "2.0", "2.1"] and not excluded
    assert isinstance(taps["2.0"], ConvTap)
    assert list(select_layers(model, "2.1")[0]) == ["2.1"]
    assert list(select_layers(model, ["2.1", "0"])[0]) == ["2.1", "0"]
    assert list(select_layers(model, nn.Conv1d)[0]) == ["2.0"]
    assert list(select_layers(model, (nn.Conv1d, nn.Linear))[0]) == ["0", "2.0", "2.1"]
    assert list(select_layers(model, lambda n, m: n.startswith("2."))[0]) == ["2.0", "2.1"]


@pytest.mark.parametrize(
    "layers,exc,pattern",
    [
        ([], ValueError, "at least one layer"),
        ("9", ValueError, r"'9' does not exist.*Tappable layers: \['0', '2.0', '2.1'\]"),
        ("1", CanonRegError, r"'1' \(ReLU\) has no tap.*register_tap"),
        (nn.ReLU, CanonRegError, "no tap"),
        (lambda n, m: isinstance(m, nn.ReLU), CanonRegError, "predicate but has no tap"),
        (nn.Conv2d, ValueError, r"matched none.*all modules"),
        (lambda n, m: False, ValueError, "matched none"),
        ({"0"}, TypeError, "`layers`"),
    ],
)
def test_select_layers_errors(layers, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        select_layers(_net(), layers)


def test_select_layers_bad_model_and_taps() -> None:
    with pytest.raises(TypeError, match="`model`"):
        select_layers(object(), None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`taps`"):
        select_layers(_net(), None, taps=[LinearTap()])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`taps\[Linear\]`.*missing `check`"):
        select_layers(_net(), None, taps={nn.Linear: object()})  # type: ignore[dict-item]


def test_hookset_is_idempotent_and_owns_handles() -> None:
    lin = nn.Linear(2, 2)
    hooks = HookSet()
    hooks.add(lin.register_forward_hook(lambda *a: None))
    hooks.add(lin.register_forward_pre_hook(lambda *a: None))
    assert len(hooks) == 2 and len(lin._forward_hooks) == 1
    hooks.remove()
    hooks.remove()
    assert len(hooks) == 0 and not lin._forward_hooks and not lin._forward_pre_hooks


def test_claim_model_one_owner_per_kind() -> None:
    model = _net()
    a, b = object(), object()
    claim_model("test-kind", model, a)
    claim_model("test-kind", model, a)  # the same owner again is fine
    with pytest.raises(CanonRegError, match="already attached"):
        claim_model("test-kind", model[2], b)  # shares modules
    claim_model("other-kind", model, b)  # another kind is independent
    release_model("test-kind", model, b)  # not the owner: no effect
    with pytest.raises(CanonRegError):
        claim_model("test-kind", model, b)
    release_model("test-kind", model, a)
    claim_model("test-kind", model, b)
    release_model("test-kind", model, b)
    release_model("other-kind", model, b)


def test_all_reduce_flat_without_process_group_copies() -> None:
    ts = [torch.ones(2, 2), torch.arange(3.0), torch.tensor(5.0)]
    out = all_reduce_flat(ts)
    assert [o.shape for o in out] == [t.shape for t in ts]
    assert all(o.dtype == torch.float64 for o in out)
    for o, t in zip(out, ts):
        assert torch.equal(o, t.double())
    out[0].add_(1)
    assert torch.equal(ts[0], torch.ones(2, 2))  # inputs untouched
    assert all_reduce_flat([]) == []


# ----------------------------------------------------------------------------- weight layout
class GPT2StyleConv1D(nn.Module):
    """``y = x @ weight + bias`` with ``weight`` stored ``(d_a, d_b)``, like transformers' Conv1D."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


class UserTransposedTap:
    """A user tap with only the five required methods, returning the transposed parameter as ``W``."""

    def check(self, module: nn.Module, name: str) -> None:
        return None

    def input_rows(self, module: nn.Module, inputs: tuple[object, ...]) -> torch.Tensor:
        x = inputs[0]
        return x.reshape(-1, x.shape[-1])  # type: ignore[union-attr]

    def output_rows(self, module: nn.Module, output: torch.Tensor) -> torch.Tensor:
        return output.reshape(-1, output.shape[-1])

    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight.T  # type: ignore[union-attr]

    def bias(self, module: nn.Module) -> torch.Tensor | None:
        return module.bias  # type: ignore[return-value]


class StripLayout:
    """Wraps a built-in tap, hiding its layout methods, so the stride-derived fallback is exercised."""

    def __init__(self, tap: object) -> None:
        self.tap = tap

    def __getattr__(self, name: str) -> object:
        if name in ("matrix_view", "to_weight_layout"):
            raise AttributeError(name)
        return getattr(self.tap, name)


def test_transposed_linear_tap_rows_satisfy_affine_identity() -> None:
    layer = GPT2StyleConv1D(nf=5, nx=4).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    tap = TransposedLinearTap()
    ha, hb = tap.input_rows(layer, (x,)), tap.output_rows(layer, layer(x))
    w = tap.weight(layer)
    assert w.shape == (5, 4) and ha.shape == (6, 4) and hb.shape == (6, 5)
    assert_close(hb, ha @ w.T + tap.bias(layer))  # h_b = W h_a + b with W = weightᵀ
    assert_close(w, layer.weight.detach().T)
    assert tap.batch_size(layer, (x,)) == 2


LAYOUT_CASES = [
    (lambda: nn.Linear(4, 3), LinearTap(), lambda p: p),
    (lambda: nn.Conv1d(2, 3, 4), ConvTap(), lambda p: p.reshape(3, 8)),
    (lambda: nn.Conv2d(2, 3, (2, 3)), ConvTap(), lambda p: p.reshape(3, 12)),
    (lambda: GPT2StyleConv1D(3, 4), TransposedLinearTap(), lambda p: p.T),
    (lambda: GPT2StyleConv1D(3, 4), UserTransposedTap(), lambda p: p.T),
    (lambda: nn.Embedding(5, 3), EmbeddingTap(), lambda p: p.T),
]


@pytest.mark.parametrize("make,tap,expected_view", LAYOUT_CASES, ids=["linear", "conv1d", "conv2d", "conv1D-builtin", "conv1D-user", "embedding"])
@pytest.mark.parametrize("strip", [False, True], ids=["own", "derived"])
def test_weight_layout_round_trip_and_write_through(make, tap, expected_view, strip) -> None:
    torch.manual_seed(1)
    module = make().double()
    tap = StripLayout(tap) if strip else tap
    p = weight_parameter(tap, module, "layer")
    assert p is module.weight
    w = tap.weight(module)
    # the parameter itself maps to W, W maps back to the parameter
    assert_close(matrix_view(tap, module, p.detach()), w.detach())
    assert_close(to_weight_layout(tap, module, w.detach()), p.detach())
    # any tensor shaped like the parameter (a gradient) follows the same layout, given independently
    g = torch.randn_like(p)
    assert_close(matrix_view(tap, module, g), expected_view(g))
    m = torch.randn(w.shape, dtype=torch.float64)
    back = to_weight_layout(tap, module, m)
    assert back.shape == p.shape
    assert_close(expected_view(back), m)
    # in-place writes through the view reach the gradient (what the noise wrapper relies on)
    before = g.clone()
    matrix_view(tap, module, g).add_(m)
    assert_close(g, before + to_weight_layout(tap, module, m))


def test_weight_layout_refuses_wrong_shapes_and_computed_weights() -> None:
    lin = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"`t` to be a tensor of shape \(3, 4\)"):
        matrix_view(LinearTap(), lin, torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"`m` to be a tensor of shape \(3, 4\)"):
        to_weight_layout(StripLayout(TransposedLinearTap()), GPT2StyleConv1D(3, 4), torch.zeros(4, 3))

    class Standardised(UserTransposedTap):
        def weight(self, module: nn.Module) -> torch.Tensor:
            return (module.weight - module.weight.mean()).T  # computed: no parameter behind it

    with pytest.raises(CanonRegError, match="not a parameter of the module or a view"):
        weight_parameter(Standardised(), GPT2StyleConv1D(3, 4), "std")
    with pytest.raises(CanonRegError, match="not a parameter"):
        matrix_view(Standardised(), GPT2StyleConv1D(3, 4), torch.zeros(4, 3))
    assert_close(weight_matrix(lin), lin.weight)
    with pytest.raises(CanonRegError, match="lookup table"):
        weight_matrix(nn.Embedding(3, 2))


# ----------------------------------------------------------------------------- exact types, coverage
class StdConv2dLike(nn.Conv2d):
    """Like timm's StdConv2d: convolves with the standardised weight, not ``.weight``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-6)
        return self._conv_forward(x, w, self.bias)


class Conv2dSameLike(nn.Conv2d):
    """Like timm's Conv2dSame: pads dynamically (TF 'SAME') before a padding-free convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F_conv_same(x, self)


def F_conv_same(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    ih, iw = x.shape[-2:]
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
    pw = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
    x = torch.nn.functional.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
    return torch.nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


class ScaledConvForward(nn.Conv2d):
    """Overrides only ``_conv_forward`` (scales the weight)."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return super()._conv_forward(x, 2.0 * weight, bias)


class PlainSubclass(nn.Conv2d):
    """Keeps Conv2d's forward: the parent's tap is exact."""


class OwnForwardLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(2 * x)


def test_subclass_with_own_forward_is_never_taken_as_its_parent() -> None:
    std, same, scaled = StdConv2dLike(2, 3, 3), Conv2dSameLike(2, 3, 3, stride=2), ScaledConvForward(2, 3, 3)
    for m in (std, same, scaled, OwnForwardLinear(3, 2)):
        assert get_tap(m) is None
        assert "defines its own `forward`/`_conv_forward`" in (untapped_reason(m) or "")
    assert isinstance(get_tap(PlainSubclass(2, 3, 3)), ConvTap) and untapped_reason(PlainSubclass(2, 3, 3)) is None
    assert isinstance(get_tap(nn.LazyLinear(3)), LinearTap)  # keeps Linear's forward
    # the subclass's affine identity with the parent's tap fails: the reason the tap is refused
    x = torch.randn(2, 2, 7, 7)
    ha, hb = ConvTap().input_rows(std, (x,)), ConvTap().output_rows(std, std(x))
    assert (hb - (ha @ ConvTap().weight(std).T + std.bias)).abs().max() > 0.1

    model = nn.Sequential(std, nn.ReLU(), same, scaled, PlainSubclass(3, 3, 1), nn.Conv2d(3, 2, 1))
    chosen, _, excluded = select_layers(model, None)
    assert list(chosen) == ["4", "5"]
    assert list(excluded) == ["0", "2", "3"]
    assert "StdConv2dLike subclasses torch.nn.modules.conv.Conv2d" in excluded["0"]
    assert "register_tap(StdConv2dLike" in excluded["0"]
    chosen, _, excluded = select_layers(model, nn.Conv2d)  # isinstance matches: excluded, not taken as Conv2d
    assert list(chosen) == ["4", "5"] and list(excluded) == ["0", "2", "3"]
    with pytest.raises(CanonRegError, match=r"'0' \(StdConv2dLike\) has no tap.*defines its own `forward`"):
        select_layers(model, ["0"])
    # a tap registered for the exact subclass (here: locally) is used
    chosen, taps, excluded = select_layers(model, None, taps={Conv2dSameLike: ConvTap()})
    assert list(chosen) == ["2", "4", "5"] and isinstance(taps["2"], ConvTap)


class CustomScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))


class Everything(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.bag = nn.EmbeddingBag(10, 4)
        self.lstm = nn.LSTM(4, 4)
        self.gru = nn.GRU(4, 4)
        self.rnn = nn.RNN(4, 4)
        self.mha = nn.MultiheadAttention(4, 2)
        self.bil = nn.Bilinear(4, 4, 2)
        self.c3 = nn.Conv3d(2, 2, 1)
        self.ct1 = nn.ConvTranspose1d(2, 2, 3)
        self.ct2 = nn.ConvTranspose2d(2, 2, 3)
        self.ln = nn.LayerNorm(4)
        self.bn = nn.BatchNorm2d(2)
        self.gn = nn.GroupNorm(1, 2)
        self.prelu = nn.PReLU()
        self.custom = CustomScale()
        self.dw = nn.Conv2d(4, 4, 3, groups=4)
        self.std = StdConv2dLike(2, 2, 3)
        self.lin = nn.Linear(4, 2)
        self.conv = nn.Conv1d(2, 2, 1)
        self.frozen_bn = nn.BatchNorm1d(2, affine=False)  # no parameters: nothing to report


def test_every_module_with_parameters_is_measured_or_excluded_with_a_reason() -> None:
    model = Everything()
    chosen, _, excluded = select_layers(model, None)
    assert list(chosen) == ["mha", "lin", "conv"]  # mha: sub-layers q, k, v and out (its out_proj)
    with_params = {n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    assert set(excluded) == with_params - set(chosen) - {"mha.out_proj"}  # nothing with parameters left out silently
    assert not set(excluded) & set(chosen)
    expected_words = {
        "emb": "lookup table", "bag": "lookup table", "lstm": "fused kernel", "gru": "fused kernel",
        "rnn": "fused kernel", "bil": "bilinear",
        "c3": "3-D convolution", "ct1": "transposed convolution", "ct2": "transposed convolution",
        "ln": "normalisation", "bn": "normalisation", "gn": "normalisation", "prelu": "elementwise",
        "custom": "has parameters but no tap", "dw": "grouped convolution (groups=4)",
        "std": "defines its own `forward`",
    }
    assert set(expected_words) == set(excluded)
    for name, words in expected_words.items():
        assert words in excluded[name], (name, excluded[name])
    assert canonreg.CRHMonitor(model).excluded == excluded  # the monitor reports the same coverage
    # without its attention module, out_proj is excluded with the reason and where it is measured
    _, _, only_linear = select_layers(model, nn.Linear)
    assert "functionally" in only_linear["mha.out_proj"] and "'mha[out]'" in only_linear["mha.out_proj"]


class EmbedNet(nn.Module):
    def __init__(self, first: nn.Module) -> None:
        super().__init__()
        self.first, self.head = first, nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.first(x))).mean(1)


def test_embedding_tap_equals_a_linear_layer_on_one_hot_inputs() -> None:
    torch.manual_seed(0)
    emb = EmbedNet(nn.Embedding(6, 3, padding_idx=0)).double()
    lin = EmbedNet(nn.Linear(6, 3, bias=False)).double()
    with torch.no_grad():
        lin.first.weight.copy_(emb.first.weight.T)
        lin.head.load_state_dict(emb.head.state_dict())
    idx = torch.randint(0, 6, (4, 5), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 4, (4,), generator=torch.Generator().manual_seed(2))
    assert "first" in select_layers(emb, None)[2]  # opt-in: excluded by default, the reason names the tap
    assert "EmbeddingTap" in select_layers(emb, None)[2]["first"]
    reports = []
    for model, x in ((emb, idx), (lin, torch.nn.functional.one_hot(idx, 6).double())):
        monitor = canonreg.CRHMonitor(model, taps={nn.Embedding: EmbeddingTap()}, preprocess="raw")
        with monitor:
            torch.nn.functional.cross_entropy(model(x), y).backward()
        reports.append(monitor.compute(exponents=False))
    assert reports[0].samples["first"] == 20
    for key, value in reports[1].matrices("first").items():
        assert_close(reports[0].matrices("first")[key], value, msg=key)
    with pytest.raises(CanonRegError, match="EmbeddingTap"):
        EmbeddingTap().check(nn.Linear(2, 2), "lin")
