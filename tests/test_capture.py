"""The capture engine (canonreg.capture) against a per-call reference written the obvious way.

Reference: a plain forward hook keeps each call's input and output tensors, the rows are built with
the explicit loops of ``conftest.rows_in`` / ``rows_out`` and the output gradients come from one
``torch.autograd.grad`` of the loss with respect to those outputs.
"""

from __future__ import annotations

import copy
import gc
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import ConvNet1d, ConvNet2d, TinyEncoder, rows_in, rows_out
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.testing import assert_close

from canonreg.capture import Backward, Capture, LayerCall
from canonreg.errors import CanonRegError
from canonreg.taps import LinearTap, masked

pytestmark = pytest.mark.usefixtures("single_thread")


class Recorder:
    """An owner that keeps every delivered call's rows (and, with ``samples``, those of a subset)."""

    def __init__(self, samples: Tensor | None = None) -> None:
        self.samples = samples
        self.calls: list[dict[str, object]] = []
        self.roots = 0

    def on_root(self) -> None:
        self.roots += 1

    def on_call(self, call: LayerCall) -> Backward:
        rec: dict[str, object] = {
            "name": call.name,
            "index": call.index,
            "h_a": call.input_rows(self.samples),
            "h_b": call.output_rows(self.samples),
        }
        self.calls.append(rec)
        return Backward(lambda g: rec.__setitem__("g_b", g), self.samples)

    def capture(self, model: nn.Module, layers: object = None, **kw: object) -> Capture:
        return Capture(model, layers, owner_kind=kw.pop("owner_kind", "test"), on_call=self.on_call, on_root=self.on_root, **kw)  # type: ignore[arg-type]


def _reference(model: nn.Module, names: list[str], x: Tensor) -> list[dict[str, object]]:
    """Per call, in forward order: the layer name, its input/output rows and the output-gradient rows."""
    seen: list[tuple[str, nn.Module, Tensor, Tensor]] = []
    handles = [
        dict(model.named_modules())[n].register_forward_hook(lambda m, i, o, n=n: seen.append((n, m, i[0], o))) for n in names
    ]
    try:
        loss = model(x).square().sum()
    finally:
        for h in handles:
            h.remove()
    grads = torch.autograd.grad(loss, [o for _, _, _, o in seen])
    return [
        {"name": n, "h_a": rows_in(m, i.detach()), "h_b": rows_out(m, o.detach()), "g_b": rows_out(m, g)}
        for (n, m, i, o), g in zip(seen, grads)
    ]


def _by_name(calls: list[dict[str, object]]) -> dict[str, list[dict[str, object]]]:
    out: dict[str, list[dict[str, object]]] = {}
    for c in calls:
        out.setdefault(str(c["name"]), []).append(c)
    return out


def _assert_calls_match(got: list[dict[str, object]], ref: list[dict[str, object]], keep: Tensor | None = None) -> None:
    g, r = _by_name(got), _by_name(ref)
    assert sorted(g) == sorted(r)
    for name in r:
        assert len(g[name]) == len(r[name]), name
        for i, (a, b) in enumerate(zip(g[name], r[name])):
            assert a["index"] == i
            for key in ("h_a", "h_b", "g_b"):
                want = b[key] if keep is None else b[key][keep]  # type: ignore[index]
                assert_close(a[key], want, msg=f"{name} call {i} {key}")


@pytest.mark.parametrize("make", [ConvNet1d, ConvNet2d, TinyEncoder], ids=["conv1d", "conv2d", "transformer"])
def test_rows_equal_per_call_reference(make: type[nn.Module]) -> None:
    model = make().double()
    x = {ConvNet1d: (3, 2, 9), ConvNet2d: (2, 2, 5, 4), TinyEncoder: (2, 3, 4)}[make]
    x = torch.randn(*x, dtype=torch.float64)
    rec = Recorder()
    with rec.capture(model) as cap:
        # module-level layers (the attention's sub-layers q, k, v, out: tests/test_attention.py)
        names = [n for n, t in cap.targets.items() if t.sub is None]
        model(x).square().sum().backward()
    ref = _reference(model, names, x)
    _assert_calls_match([c for c in rec.calls if c["name"] in names], ref)
    assert rec.roots == 1


def test_repeated_calls_and_samples() -> None:
    # One layer called twice per pass (weight sharing): two calls, in order; `samples` picks batch elements.
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(torch.tanh(self.fc(x)))

    model = Twice().double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    samples = torch.tensor([4, 1])
    rec = Recorder(samples)
    with rec.capture(model):
        model(x).square().sum().backward()
    ref = _reference(model, ["fc"], x)
    rows_of_samples = torch.cat([torch.arange(3) + 3 * int(s) for s in samples])  # 3 positions per sample
    _assert_calls_match(rec.calls, ref, keep=rows_of_samples)
    assert [c["index"] for c in rec.calls] == [0, 1]


def test_sample_mask_keeps_the_same_rows_and_skips_empty_calls() -> None:
    model = TinyEncoder().double()
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    rec = Recorder()
    with rec.capture(model, ["embed", "head"]) as cap, masked(mask):
        model(x).square().sum().backward()
    _assert_calls_match(rec.calls, _reference(model, ["embed", "head"], x), keep=mask.reshape(-1).bool())
    # mask=False ignores it; a call whose rows are all masked out is not delivered
    rec2 = Recorder()
    with rec2.capture(model, ["head"], mask=False), masked(mask):
        model(x).sum().backward()
    assert rec2.calls[0]["h_a"].shape[0] == 12  # type: ignore[union-attr]
    with masked(torch.zeros(3, 4, dtype=torch.bool)):
        model(x).sum().backward()
    assert cap.stats["head"].masked_out == 0 and len(rec2.calls) == 1
    with rec.capture(model, ["head"], owner_kind="other") as cap2, masked(torch.zeros(3, 4, dtype=torch.bool)):
        model(x).sum().backward()
    assert cap2.stats["head"].masked_out == 1 and cap2.stats["head"].delivered == 0


def test_mask_with_samples_selects_kept_rows_of_those_samples() -> None:
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    samples = torch.tensor([2, 0])
    rec = Recorder(samples)
    with rec.capture(model), masked(mask):
        model(x).square().sum().backward()
    keep = mask[samples].reshape(-1)
    ref = _reference(model, ["0"], x)[0]
    for key in ("h_a", "h_b", "g_b"):
        want = ref[key].reshape(3, 4, -1)[samples].reshape(8, -1)[keep]  # type: ignore[union-attr]
        assert_close(rec.calls[0][key], want)


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_lifecycle_attach_detach_with_nesting_and_exceptions() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    rec = Recorder()
    cap = rec.capture(model)
    assert not cap.attached and _no_hooks(model)
    assert cap.attach() is cap and cap.attach() is cap and cap.attached
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert n_hooks == 3  # root pre-hook + two layers, installed once
    assert cap.detach() is cap and cap.detach() is cap and _no_hooks(model)
    with cap:
        with cap:  # nested: the inner block does not detach
            pass
        assert cap.attached
    assert not cap.attached and _no_hooks(model)
    cap.attach()
    with cap:  # attached before the block: stays attached after it
        pass
    assert cap.attached
    cap.detach()
    with pytest.raises(RuntimeError, match="boom"), cap:
        raise RuntimeError("boom")
    assert not cap.attached and _no_hooks(model)
    with torch.no_grad(), cap:  # no gradients: no call is delivered, no pass begins
        model(torch.randn(2, 3))
    assert rec.calls == [] and rec.roots == 0


def test_one_owner_per_kind_and_failed_attach_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    a, b = Recorder(), Recorder()
    cap = a.capture(model).attach()
    with pytest.raises(CanonRegError, match="already attached"):
        b.capture(model).attach()
    other = b.capture(model, owner_kind="another kind").attach()  # other kinds coexist
    cap.detach()
    other.detach()

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("refused")

    monkeypatch.setattr(model[2], "register_forward_hook", refuse)
    with pytest.raises(RuntimeError, match="refused"):
        b.capture(model).attach()
    assert _no_hooks(model)
    monkeypatch.undo()
    a.capture(model).attach().detach()  # the failed attach released its claim


def test_dropped_owner_takes_its_hooks() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

    class Owner:
        def __init__(self) -> None:
            self.n = 0
            self.cap = Capture(model, owner_kind="owner", on_call=self.on_call).attach()

        def on_call(self, call: LayerCall) -> None:
            self.n += 1

    owner = Owner()
    model(torch.randn(2, 3)).sum().backward()
    assert owner.n == 2
    del owner
    gc.collect()
    assert _no_hooks(model)
    Owner()  # the claim went with it


def test_copies_carry_no_hooks_and_capture_never_pickles() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    rec = Recorder()
    cap = rec.capture(model).attach()
    twin = copy.deepcopy(model)
    loaded = pickle.loads(pickle.dumps(model))
    for m in (twin, loaded):
        m(torch.randn(2, 3)).sum().backward()
        assert _no_hooks(m)  # inert hooks removed themselves at the first call
    assert rec.calls == [] and rec.roots == 0
    model(torch.randn(2, 3)).sum().backward()
    assert len(rec.calls) == 2  # the original is still captured
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(cap)
    with pytest.raises(TypeError, match="never pickled"):
        copy.deepcopy(cap)


def test_untraced_calls_are_not_delivered() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    rec = Recorder()
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    params = {k: v.detach() for k, v in model.named_parameters()}
    with rec.capture(model) as cap:

        def loss_fn(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
            return F.cross_entropy(functional_call(model, p, (xb,)), yb)

        vmap(grad(loss_fn), in_dims=(None, 0, 0))(params, x[:, None], y[:, None])
        F.cross_entropy(functional_call(model, {k: v + 1 for k, v in params.items()}, (x,)), y)
    assert rec.calls == [] and rec.roots == 0
    assert cap.stats["0"].untraced == 2 and cap.stats["0"].delivered == 0


@pytest.mark.parametrize("policy", ["error", "warn", "skip"])
def test_nonfinite_policy_names_layer_and_call(policy: str) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    rec = Recorder()
    bad = torch.randn(2, 3)
    bad[1, 0] = float("nan")
    with rec.capture(model, nonfinite=policy) as cap:  # type: ignore[arg-type]
        model(torch.randn(2, 3)).sum().backward()  # call 0 of each layer: fine
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if policy == "error":
                with pytest.raises(CanonRegError, match=r"Non-finite activations \(h_a\) in layer '0', call 1"):
                    model(bad)
            else:
                model(bad).sum().backward()
        msgs = [str(w.message) for w in caught if "Non-finite" in str(w.message)]
        if policy == "warn":  # one per layer the NaN reaches, each naming the layer and the call
            assert len(msgs) == 2 and "layer '0', call 1" in msgs[0] and "layer '2', call 1" in msgs[1]
        else:
            assert msgs == []
    if policy != "error":
        # the NaN input reaches every layer: both calls dropped, nothing of them delivered
        assert [c["name"] for c in rec.calls] == ["0", "2"]
        assert cap.stats["0"].nonfinite == 1 and cap.stats["2"].nonfinite == 1
        assert all("g_b" in c for c in rec.calls)


def test_nonfinite_gradient_rows_are_dropped() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    rec = Recorder()
    with rec.capture(model, nonfinite="skip") as cap:
        (model(torch.randn(2, 3)) * torch.tensor([1.0, float("inf")])).sum().backward()
    assert len(rec.calls) == 1 and "g_b" not in rec.calls[0] and cap.stats["0"].nonfinite == 1
    with rec.capture(model, nonfinite="error"), pytest.raises(CanonRegError, match=r"gradients \(dL/dh_b\) in layer '0'"):
        (model(torch.randn(2, 3)) * torch.tensor([1.0, float("inf")])).sum().backward()


def test_need_grad_false_delivers_calls_without_gradients() -> None:
    model = nn.Sequential(nn.Linear(3, 2)).requires_grad_(False)
    x = torch.randn(4, 3)
    rec = Recorder()
    with rec.capture(model, need_grad=False):
        model(x)
    assert len(rec.calls) == 1 and "g_b" not in rec.calls[0]
    assert_close(rec.calls[0]["h_b"], model(x))
    rec2 = Recorder()
    with rec2.capture(model) as cap:  # default: only outputs that require grad
        model(x)
    assert rec2.calls == [] and cap.stats["0"].no_grad_output == 1 and cap.stats["0"].fired == 1


def test_dtype_rule_upcasts_half_precision_rows() -> None:
    model = nn.Sequential(nn.Linear(3, 2)).to(torch.bfloat16)
    rec = Recorder()
    with rec.capture(model):
        model(torch.randn(4, 3, dtype=torch.bfloat16)).float().sum().backward()
    assert all(rec.calls[0][k].dtype == torch.float32 for k in ("h_a", "h_b", "g_b"))  # type: ignore[union-attr]


# ------------------------------------------------------------------ sub-layers (one module call, several layers)
class FusedQKV(nn.Module):
    """``[q k v] = x Wᵀ + b`` with one ``(3d, d_in)`` weight, as MHA's in_proj."""

    def __init__(self, d_in: int, d: int) -> None:
        super().__init__()
        self.d = d
        self.weight = nn.Parameter(torch.randn(3 * d, d_in))
        self.bias = nn.Parameter(torch.randn(3 * d))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class _PartTap(LinearTap):
    """One of q, k, v: the input rows are shared, the output (and its gradient) is the part's slice."""

    def __init__(self, i: int) -> None:
        self.i = i

    def output_rows(self, module: nn.Module, output: Tensor) -> Tensor:
        d = module.d  # type: ignore[union-attr]
        return output[..., self.i * d : (self.i + 1) * d].reshape(-1, d)

    def weight(self, module: nn.Module) -> Tensor:
        return module.weight[self.i * module.d : (self.i + 1) * module.d]  # type: ignore[index, operator]

    def bias(self, module: nn.Module) -> Tensor:
        return module.bias[self.i * module.d : (self.i + 1) * module.d]  # type: ignore[index, operator]


class FusedQKVTap(LinearTap):
    """The whole fused layer, and its three sub-layers ``[q]``, ``[k]``, ``[v]``."""

    def sublayers(self, module: nn.Module) -> dict[str, _PartTap]:
        return {"q": _PartTap(0), "k": _PartTap(1), "v": _PartTap(2)}


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.in_proj = FusedQKV(4, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.in_proj(x).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return self.out(a @ v)


def test_a_tap_may_split_one_module_call_into_named_sublayers() -> None:
    model = Attn().double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    rec = Recorder()
    with rec.capture(model, taps={FusedQKV: FusedQKVTap()}) as cap:
        assert list(cap.targets) == ["in_proj[q]", "in_proj[k]", "in_proj[v]", "out"]
        assert cap.targets["in_proj[k]"].layer == "in_proj" and cap.targets["in_proj[k]"].sub == "k"
        model(x).square().sum().backward()
    # reference: the fused output and its gradient, sliced by hand
    ref = _reference(model, ["in_proj"], x)[0]
    for i, part in enumerate("qkv"):
        got = _by_name(rec.calls)[f"in_proj[{part}]"]
        assert len(got) == 1
        assert_close(got[0]["h_a"], ref["h_a"])
        for key in ("h_b", "g_b"):
            assert_close(got[0][key], ref[key][:, 3 * i : 3 * i + 3])  # type: ignore[index]
        w = cap.targets[f"in_proj[{part}]"].tap.weight(model.in_proj)
        b = cap.targets[f"in_proj[{part}]"].tap.bias(model.in_proj)
        assert_close(got[0]["h_b"], got[0]["h_a"] @ w.detach().T + b.detach())  # h_b = W h_a + b per sub-layer


def test_exclude_drops_a_target_before_attach() -> None:
    model = Attn()
    rec = Recorder()
    cap = rec.capture(model, taps={FusedQKV: FusedQKVTap()})
    cap.exclude("in_proj[k]", "not needed here")
    assert cap.excluded["in_proj[k]"] == "not needed here"
    cap.exclude("out", "frozen")
    assert "out" not in cap.modules
    with cap:
        model(torch.randn(2, 5, 4)).sum().backward()
        with pytest.raises(CanonRegError, match="while the capture is attached"):
            cap.exclude("in_proj[q]", "x")
    assert [c["name"] for c in rec.calls] == ["in_proj[q]", "in_proj[v]"]
    with pytest.raises(ValueError, match="captured layers"):
        cap.exclude("nope", "x")


def test_bad_arguments_are_refused_early() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="nonfinite"):
        Capture(model, owner_kind="t", on_call=lambda c: None, nonfinite="ignore")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_call"):
        Capture(model, owner_kind="t", on_call=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="owner_kind"):
        Capture(model, owner_kind="", on_call=lambda c: None)
    with pytest.raises(ValueError, match="does not exist"):
        Capture(model, "nope", owner_kind="t", on_call=lambda c: None)
