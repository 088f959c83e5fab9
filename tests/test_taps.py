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
from canonreg.taps import ConvTap, LinearTap, default_taps, functional_only_children, get_tap, register_tap, tap_batch_size

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
    with pytest.raises(CanonRegError, match="grouped"):
        select_layers(nn.Sequential(conv), None)
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
