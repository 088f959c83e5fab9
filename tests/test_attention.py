"""nn.MultiheadAttention measured as q, k, v and out (canonreg.attention) against an explicit-projection twin.

The reference: the same attention written the obvious way with four ``nn.Linear`` layers (copies of the
module's weights), batch-first, per-layer plain hooks collecting rows of h_a, h_b and dL/dh_b; the moments
are dense ``XᵀX / n``. Rows are batch-major in both (sample, then position).
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import canonreg
from canonreg.errors import CanonRegError

SUBS = ("q", "k", "v", "out")


class Twin(nn.Module):
    """The attention of ``mha`` with explicit projections (weights copied), batch-first in and out."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        e, h = mha.embed_dim, mha.num_heads
        self.heads = h
        self.q, self.k, self.v = nn.Linear(e, e, bias=mha.in_proj_bias is not None), nn.Linear(mha.kdim, e, bias=mha.in_proj_bias is not None), nn.Linear(mha.vdim, e, bias=mha.in_proj_bias is not None)
        self.out = nn.Linear(e, e, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            for i, lin in enumerate((self.q, self.k, self.v)):
                w = mha.in_proj_weight[i * e : (i + 1) * e] if mha._qkv_same_embed_dim else getattr(mha, "qkv"[i] + "_proj_weight")
                lin.weight.copy_(w)
                if lin.bias is not None:
                    lin.bias.copy_(mha.in_proj_bias[i * e : (i + 1) * e])
            self.out.weight.copy_(mha.out_proj.weight)
            if self.out.bias is not None:
                self.out.bias.copy_(mha.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(query), self.k(key), self.v(value)
        n, t, e = q.shape
        hd = e // self.heads

        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(n, -1, self.heads, hd).transpose(1, 2)

        att = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(hd), dim=-1)
        return self.out((att @ heads(v)).transpose(1, 2).reshape(n, t, e))


class AttnNet(nn.Module):
    """Linear → attention (self or cross) → Linear head; ``attn`` is an MHA or its Twin."""

    def __init__(self, attn: nn.Module, d_in: int, e: int, batch_first: bool, cross: str) -> None:
        super().__init__()
        self.inp, self.attn, self.head = nn.Linear(d_in, e), attn, nn.Linear(e, 3)
        self.batch_first, self.cross = batch_first, cross

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        key = h if self.cross == "self" else mem
        value = key if self.cross in ("self", "kv") else mem + 1.0
        if isinstance(self.attn, Twin):
            return self.head(self.attn(h, key, value))
        if not self.batch_first:  # the module wants (T, N, E)
            h, key, value = (z.transpose(0, 1) for z in (h, key, value))
        a, _ = self.attn(h, key, value, need_weights=False)
        return self.head(a if self.batch_first else a.transpose(0, 1))


def _pair(batch_first: bool = True, cross: str = "self", kdim: int | None = None, bias: bool = True) -> tuple[AttnNet, AttnNet]:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias).double()
    model = AttnNet(mha, 5, 8, batch_first, cross).double()
    twin = AttnNet(Twin(mha), 5, 8, batch_first, cross).double()
    twin.inp.load_state_dict(model.inp.state_dict())
    twin.head.load_state_dict(model.head.state_dict())
    return model, twin


def _data(kdim: int | None = None, n: int = 3, t: int = 4, s: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, t, 5, generator=g, dtype=torch.float64), torch.randn(n, s, kdim or 8, generator=g, dtype=torch.float64)


def _reference_rows(twin: AttnNet, x: torch.Tensor, mem: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    rows: dict[str, dict[str, list[torch.Tensor]]] = {s: {"x": [], "y": [], "gx": [], "gy": []} for s in SUBS}

    def hook(sub: str):
        def fn(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            xin = inputs[0]
            rows[sub]["x"].append(xin.detach().reshape(-1, xin.shape[-1]))
            rows[sub]["y"].append(output.detach().reshape(-1, output.shape[-1]))
            output.register_hook(lambda g: rows[sub]["gy"].append(g.reshape(-1, g.shape[-1])))
            output.register_hook(lambda g: rows[sub]["gx"].append((g @ module.weight).reshape(-1, module.weight.shape[1])))

        return fn

    handles = [getattr(twin.attn, s).register_forward_hook(hook(s)) for s in SUBS]
    twin(x, mem).square().sum().backward()
    for h in handles:
        h.remove()
    return {s: {k: torch.cat(v) for k, v in r.items()} for s, r in rows.items()}


@pytest.mark.parametrize(
    "batch_first,cross,kdim,bias",
    [(True, "self", None, True), (False, "self", None, True), (True, "kv", None, True), (True, "qkv", None, False), (False, "qkv", 6, True)],
    ids=["self", "self-seq-first", "cross-kv-packed", "cross-three-no-bias", "separate-kdim-seq-first"],
)
def test_monitor_matrices_of_q_k_v_out_equal_the_explicit_projection_reference(batch_first: bool, cross: str, kdim: int | None, bias: bool) -> None:
    model, twin = _pair(batch_first, cross, kdim, bias)
    x, mem = _data(kdim)
    assert_close(model(x, mem), twin(x, mem), rtol=1e-12, atol=1e-12)  # the twin is the same function
    ref = _reference_rows(twin, x, mem)
    monitor = canonreg.CRHMonitor(model, preprocess="raw", identities=False, grad_scale="none")
    assert list(monitor.layers) == ["inp", "attn[q]", "attn[k]", "attn[v]", "attn[out]", "head"]
    assert "attn.out_proj" not in monitor.excluded  # measured as attn[out]
    with monitor:
        model(x, mem).square().sum().backward()
    report = monitor.compute(exponents=False)
    for sub in SUBS:
        r = ref[sub]
        lin = getattr(twin.attn, sub)
        n = r["x"].shape[0]
        assert n == (x.shape[0] * (x.shape[1] if sub in ("q", "out") or cross == "self" else mem.shape[1]))
        expected = {
            "H_a": r["x"].T @ r["x"] / n, "H_b": r["y"].T @ r["y"] / n, "G_a": r["gx"].T @ r["gx"] / n,
            "G_b": r["gy"].T @ r["gy"] / n, "Z_a": lin.weight.T @ lin.weight, "Z_b": lin.weight @ lin.weight.T,
        }  # fmt: skip
        got = report.matrices(f"attn[{sub}]")
        for key, want in expected.items():
            assert_close(got[key], want.detach(), rtol=1e-9, atol=1e-12, msg=f"{sub} {key}")


def test_the_output_is_bit_identical_with_every_owner_attached() -> None:
    model, _ = _pair()
    model = model.float()
    x, mem = (t.float() for t in _data())
    plain = model(x, mem)
    for make in (
        lambda: canonreg.CRHMonitor(model),
        lambda: canonreg.AlignmentLoss(model, relations=("f-RWA",)),
        lambda: canonreg.NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model),
    ):
        owner = make()
        owner.attach()
        assert torch.equal(model(x, mem), plain)
        owner.detach()
    assert torch.equal(model(x, mem), plain)


def test_alignment_loss_value_and_gradients_equal_the_twin() -> None:
    # g_mode="ema": "exact" differentiates twice through the attention, which torch's CPU SDPA kernel refuses
    model, twin = _pair(cross="kv")
    x, mem = _data()
    names = {"inp": "inp", "head": "head", **{f"attn[{s}]": f"attn.{s}" for s in SUBS}}
    grads = {}
    values = {}
    for kind, net in (("mha", model), ("twin", twin)):
        loss = canonreg.AlignmentLoss(net, relations=("f-RWA", "b-RWA", "f-RGA", "b-GWA"), g_mode="ema")
        assert sorted(names[n] if kind == "mha" else n for n in loss.layer_names) == sorted(names.values())
        net(x, mem).square().mean().backward()  # one pass for the G averages (g_mode="ema")
        net.zero_grad()
        task = net(x, mem).square().mean()
        value = loss(task)
        value.backward()
        values[kind] = value.detach()
        grads[kind] = {n: p.grad.clone() for n, p in net.named_parameters()}
        loss.detach()
    assert_close(values["mha"], values["twin"], rtol=1e-10, atol=1e-12)
    e = 8
    in_grad = grads["mha"]["attn.in_proj_weight"]
    for i, s in enumerate("qkv"):
        assert_close(in_grad[i * e : (i + 1) * e], grads["twin"][f"attn.{s}.weight"], rtol=1e-9, atol=1e-12)
        assert_close(grads["mha"]["attn.in_proj_bias"][i * e : (i + 1) * e], grads["twin"][f"attn.{s}.bias"], rtol=1e-9, atol=1e-12)
    assert_close(grads["mha"]["attn.out_proj.weight"], grads["twin"]["attn.out.weight"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("base", ["sgd-momentum", "adam"])
def test_noise_wrapper_on_q_k_v_out_equals_the_twin(base: str) -> None:
    # q, k, v share in_proj_weight: each gets its own rows of noise, balance and (Adam) preconditioning
    model, twin = _pair(cross="kv")
    x, mem = _data()
    names = {"inp": "inp", "head": "head", **{f"attn[{s}]": f"attn.{s}" for s in SUBS}}
    opts = {}
    for kind, net in (("mha", model), ("twin", twin)):
        inner = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9) if base == "sgd-momentum" else torch.optim.Adam(net.parameters(), lr=1e-3)
        opt = canonreg.NoiseCalibrated(inner, net, noise=0.5, weight_decay=1e-2, sketch=2, seed=0)
        for _ in range(3):
            opt.zero_grad()
            net(x, mem).square().mean().backward()
            opt.step()
        opts[kind] = opt
    assert sorted(names[n] for n in opts["mha"]._layers) == sorted(opts["twin"]._layers) and not opts["mha"].excluded
    e = 8
    for i, s in enumerate("qkv"):
        assert_close(model.attn.in_proj_weight[i * e : (i + 1) * e], twin.attn.get_submodule(s).weight, rtol=1e-9, atol=1e-12)
        assert_close(model.attn.in_proj_bias[i * e : (i + 1) * e], twin.attn.get_submodule(s).bias, rtol=1e-9, atol=1e-12)
    assert_close(model.attn.out_proj.weight, twin.attn.out.weight, rtol=1e-9, atol=1e-12)
    for name, ref in names.items():
        got, want = opts["mha"].balance[name], opts["twin"].balance[ref]
        for key, value in want.to_dict().items():
            assert got.to_dict()[key] == pytest.approx(value, rel=1e-9, abs=1e-15), (name, key)

def test_sample_mask_selects_the_same_rows_as_the_unmasked_positions() -> None:
    model, _ = _pair()
    x, mem = _data()
    keep = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    full = canonreg.CRHMonitor(model, preprocess="raw", identities=False, grad_scale="none")
    masked = canonreg.CRHMonitor(model, preprocess="raw", identities=False, grad_scale="none")
    rows: dict[str, torch.Tensor] = {}
    with full:
        model(x, mem).square().sum().backward()
    model.zero_grad()
    with masked, canonreg.masked(keep):
        model(x, mem).square().sum().backward()
    ref = _reference_rows(_pair()[1], x, mem)
    for sub in SUBS:
        r = ref[sub]["x"][keep.reshape(-1)]
        rows[sub] = r
        assert_close(masked.compute(exponents=False, ranks=False).matrices(f"attn[{sub}]")["H_a"], r.T @ r / r.shape[0], rtol=1e-9, atol=1e-12)
    assert full.compute(exponents=False, ranks=False).layers == masked.compute(exponents=False, ranks=False).layers


def test_calls_without_grad_under_func_transforms_or_substituted_weights_are_not_recorded() -> None:
    model, _ = _pair()
    x, mem = _data()
    monitor = canonreg.CRHMonitor(model, on_missing="skip")
    with monitor:
        with torch.no_grad():
            model(x, mem)
        params = {n: p.detach() + 0.0 for n, p in model.named_parameters()}
        torch.func.functional_call(model, params, (x, mem))
        model.eval()
        with torch.inference_mode():
            model(x, mem)  # the fast path
    stats = monitor._capture.stats
    assert all(stats[f"attn[{s}]"].delivered == 0 for s in SUBS)
    assert stats["attn[q]"].untraced == 1


def test_copies_and_pickles_carry_no_hooks_and_a_failing_forward_leaves_no_mode() -> None:
    model, _ = _pair()
    x, mem = _data()
    monitor = canonreg.CRHMonitor(model).attach()
    clone = copy.deepcopy(model)
    again = pickle.loads(pickle.dumps(model))
    for c in (clone, again):
        c(x, mem).sum().backward()
    assert monitor._capture.stats["attn[q]"].fired == 0
    with pytest.raises(AssertionError):
        model.attn(x.new_zeros(3, 4, 7), mem, mem)  # wrong width: raises inside the forward
    assert not torch._C._is_torch_function_mode_enabled()
    model(x, mem).sum().backward()
    assert monitor._capture.stats["attn[q]"].delivered == 1
    monitor.detach()


def test_errors_name_the_sub_layers() -> None:
    model, _ = _pair()
    with pytest.raises(CanonRegError, match=r"attn\.out_proj.*measured as 'attn\[out\]'"):
        canonreg.CRHMonitor(model, layers=["attn.out_proj"])
    with pytest.raises(CanonRegError, match="four sub-layers"):
        canonreg.weight_matrix(model.attn) if hasattr(canonreg, "weight_matrix") else canonreg.taps.weight_matrix(model.attn)
    assert F.linear is torch._C._nn.linear  # the inner op canonreg.attention listens for


def test_hooked_before_torch_compile_the_matrices_equal_eager() -> None:
    model, _ = _pair()
    x, mem = _data()
    got = {}
    for kind in ("compiled", "eager"):
        monitor = canonreg.CRHMonitor(model, preprocess="raw", identities=False, grad_scale="none").attach()
        run = torch.compile(model) if kind == "compiled" else model
        run(x, mem).square().sum().backward()
        got[kind] = monitor.compute(exponents=False, ranks=False)
        monitor.detach()
    for sub in SUBS:
        for key, value in got["eager"].matrices(f"attn[{sub}]").items():
            assert_close(got["compiled"].matrices(f"attn[{sub}]")[key], value, rtol=1e-9, atol=1e-12)


def test_decoder_layer_with_dropout_masks_bias_kv_and_unbatched_inputs_stays_bit_identical() -> None:
    torch.manual_seed(0)
    dec = nn.TransformerDecoderLayer(16, 4, dim_feedforward=32, dropout=0.1, batch_first=True)
    x, mem = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True

    def run() -> torch.Tensor:
        torch.manual_seed(123)  # dropout draws the same masks with and without the monitor
        return dec(x, mem, tgt_mask=nn.Transformer.generate_square_subsequent_mask(5), memory_key_padding_mask=padding, tgt_is_causal=True)

    plain = run()
    monitor = canonreg.CRHMonitor(dec)
    assert list(monitor.layers) == [f"{a}[{s}]" for a in ("self_attn", "multihead_attn") for s in SUBS] + ["linear1", "linear2"]
    with monitor:
        out = run()
        out.square().mean().backward()
    assert torch.equal(out, plain)
    samples = monitor.compute(exponents=False, ranks=False).samples
    assert samples["multihead_attn[q]"] == 15 and samples["multihead_attn[k]"] == samples["multihead_attn[v]"] == 21
    mha = nn.MultiheadAttention(16, 4, add_bias_kv=True, add_zero_attn=True)  # seq-first, need_weights=True path
    q, single = torch.randn(5, 3, 16), torch.randn(5, 16)
    before = mha(q, q, q)[0]
    monitor = canonreg.CRHMonitor(mha)
    with monitor:
        after = mha(q, q, q)[0]
        (after.sum() + mha(single, single, single)[0].sum()).backward()
    assert torch.equal(after, before)
    assert monitor.compute(exponents=False, ranks=False).samples["[q]"] == 15 + 5  # batched + unbatched call


def test_the_opened_attention_uses_torch_nn_functional_as_patched_after_import(monkeypatch: pytest.MonkeyPatch) -> None:
    # a library may patch torch.nn.functional after canonreg is imported: measured calls must run the patch too
    model, _ = _pair()
    x, mem = _data()
    calls = []
    real = F.scaled_dot_product_attention

    def patched(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs) * 2.0  # type: ignore[arg-type]

    monkeypatch.setattr(F, "scaled_dot_product_attention", patched)
    plain = model(x, mem)
    monitor = canonreg.CRHMonitor(model)
    with monitor:
        measured = model(x, mem)
        measured.sum().backward()
    assert len(calls) == 2 and torch.equal(measured, plain)
    assert monitor._capture.stats["attn[q]"].delivered == 1
