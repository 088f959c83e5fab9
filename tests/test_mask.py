"""Sample masks: padded positions are no samples (canonreg.taps.masked / mask_from_inputs).

The reference runs every sequence alone, unpadded, and collects the rows of each Linear layer with
plain hooks and ``torch.autograd`` (per-sequence losses, float64, dense outer products); the masked
monitor on the padded batch must give the same six matrices.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.testing import assert_close

import canonreg
from canonreg.errors import CanonRegError
from canonreg.taps import active_mask, kept_rows, mask_from_inputs, masked

pytestmark = pytest.mark.usefixtures("single_thread")


class TinyAttention(nn.Module):
    """Embedding, one attention block with a key-padding mask, per-token head, per-sequence head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 6)
        self.q, self.k, self.v = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.out = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)  # one row per position
        self.pool = nn.Linear(6, 2)  # one row per sequence

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = torch.tanh(self.embed(x))
        s = self.q(h) @ self.k(h).transpose(1, 2) / math.sqrt(6)
        keep = torch.ones(x.shape[:2], dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        s = s.masked_fill(~keep[:, None, :], float("-inf"))
        h = h + self.out(torch.softmax(s, -1) @ self.v(h))
        w = keep.to(h.dtype).unsqueeze(-1)
        pooled = (h * w).sum(1) / w.sum(1)
        return self.head(h), self.pool(pooled)


LAYERS = ["embed", "q", "k", "v", "out", "head", "pool"]
LENGTHS = [5, 2, 4, 3]


def _data() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    b, t = len(LENGTHS), max(LENGTHS)
    x = torch.randn(b, t, 3, generator=g, dtype=torch.float64)
    mask = torch.arange(t)[None, :] < torch.tensor(LENGTHS)[:, None]  # right padding
    x[~mask] = torch.randn(int((~mask).sum()), 3, generator=g, dtype=torch.float64) * 5  # junk in the padding
    tokens = torch.randint(0, 4, (b, t), generator=g)
    target = torch.randn(b, 2, generator=g, dtype=torch.float64)
    return x, mask.long(), tokens, target, torch.tensor(LENGTHS)


def _loss(model: TinyAttention, x: Tensor, mask: Tensor | None, tokens: Tensor, target: Tensor, n_tokens: int) -> Tensor:
    """Sum of the real tokens' cross-entropies over ``n_tokens`` plus the per-sequence squared error."""
    logits, pooled = model(x, attention_mask=mask)
    ce = F.cross_entropy(logits.reshape(-1, 4), tokens.reshape(-1), reduction="none").reshape(tokens.shape)
    if mask is not None:
        ce = ce * mask
    return ce.sum() / n_tokens + (pooled - target).square().sum()


def _reference(model: TinyAttention) -> dict[str, dict[str, Tensor]]:
    """Raw moments from each sequence run alone (no padding at all), per-sequence autograd."""
    x, _, tokens, target, lengths = _data()
    n_tokens = int(lengths.sum())
    rows: dict[str, dict[str, list[Tensor]]] = {n: {"x": [], "y": [], "gy": []} for n in LAYERS}
    outs: dict[str, Tensor] = {}

    def capture(name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            rows[name]["x"].append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]))
            rows[name]["y"].append(output.detach().reshape(-1, output.shape[-1]))
            outs[name] = output

        return hook

    handles = [model.get_submodule(n).register_forward_hook(capture(n)) for n in LAYERS]
    for i, n in enumerate(lengths.tolist()):
        outs.clear()
        loss = _loss(model, x[i : i + 1, :n], None, tokens[i : i + 1, :n], target[i : i + 1], n_tokens)
        grads = torch.autograd.grad(loss, [outs[name] for name in LAYERS])
        for name, gy in zip(LAYERS, grads):
            rows[name]["gy"].append(-gy.reshape(-1, gy.shape[-1]))
    for h in handles:
        h.remove()
    ref = {}
    for name in LAYERS:
        w = model.get_submodule(name).weight.detach()
        xs, ys, gb = (torch.cat(rows[name][k]) for k in ("x", "y", "gy"))
        ga = gb @ w
        m = xs.shape[0]
        ref[name] = {
            "H_a": xs.T @ xs / m, "H_b": ys.T @ ys / m, "G_a": ga.T @ ga / m, "G_b": gb.T @ gb / m,
            "Z_a": w.T @ w, "Z_b": w @ w.T, "n": torch.tensor(m),
        }
    return ref


def _setup() -> tuple[TinyAttention, dict[str, dict[str, Tensor]], tuple[Tensor, Tensor, Tensor, Tensor, int]]:
    """A float64 model, its unpadded reference moments, and the padded batch with its real-token count."""
    torch.manual_seed(0)
    model = TinyAttention().double()
    ref = _reference(model)
    x, mask, tokens, target, lengths = _data()
    return model, ref, (x, mask, tokens, target, int(lengths.sum()))


@pytest.mark.parametrize("identities", [False, True])
def test_masked_monitor_equals_the_unpadded_per_sequence_reference(identities: bool) -> None:
    model, ref, (x, mask, tokens, target, n_tokens) = _setup()
    assert ref["head"]["n"] == n_tokens and ref["pool"]["n"] == len(LENGTHS)
    reports = {}
    for kind in ("masked", "plain"):
        monitor = canonreg.CRHMonitor(model, preprocess="raw", grad_scale="none", identities=identities)
        with monitor:
            if kind == "masked":
                with masked(mask):
                    loss = _loss(model, x, mask, tokens, target, n_tokens)
                assert active_mask() is None
            else:
                loss = _loss(model, x, mask, tokens, target, n_tokens)
            loss.backward()  # after the block: the rows were chosen at the forward call
        reports[kind] = monitor.compute(exponents=False, ranks=False)
    got = reports["masked"]
    for name in LAYERS:
        assert got.samples[name] == int(ref[name]["n"]), name
        mats = got.matrices(name)
        for key in ("H_a", "H_b", "G_a", "G_b", "Z_a", "Z_b"):
            assert_close(mats[key], ref[name][key], rtol=1e-9, atol=1e-12, msg=f"{name} {key}")
    # without the mask the padded rows count: other sample numbers and other moments
    plain = reports["plain"]
    assert plain.samples["head"] == mask.numel() != n_tokens
    assert not torch.allclose(plain.matrices("embed")["H_a"], ref["embed"]["H_a"], rtol=1e-3)


def test_mask_from_inputs_reads_the_attention_mask_keyword() -> None:
    torch.manual_seed(0)
    model = TinyAttention().double()
    x, mask, tokens, target, lengths = _data()
    n_tokens = int(lengths.sum())
    reports = []
    for how in ("with", "keyword"):
        monitor = canonreg.CRHMonitor(model, preprocess="centered", grad_scale="none")
        handle = mask_from_inputs(model) if how == "keyword" else None
        with monitor:
            if handle is None:
                with masked(mask):
                    loss = _loss(model, x, mask, tokens, target, n_tokens)
            else:
                loss = _loss(model, x, mask, tokens, target, n_tokens)  # calls model(x, attention_mask=mask)
                assert active_mask() is None  # popped when the call returned
            loss.backward()
        reports.append(monitor.compute(exponents=False, ranks=False))
        if handle is not None:
            handle.remove()
            handle.remove()  # idempotent
            assert not model._forward_pre_hooks and not model._forward_hooks
    assert reports[1].samples["head"] == n_tokens and reports[1].samples["pool"] == len(LENGTHS)
    for name in LAYERS:
        assert reports[0].samples[name] == reports[1].samples[name]
        for key, m in reports[0].matrices(name).items():
            assert_close(reports[1].matrices(name)[key], m, rtol=1e-10, atol=1e-13, msg=f"{name} {key}")


def test_mask_from_inputs_pops_the_mask_when_forward_raises() -> None:
    class Boom(nn.Module):
        def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
            assert active_mask() is not None
            raise RuntimeError("boom")

    model = Boom()
    handle = mask_from_inputs(model)
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.zeros(2, 3), attention_mask=torch.ones(2, 3))
    assert active_mask() is None
    handle.remove()


def test_a_layer_whose_rows_do_not_fit_the_mask_raises_naming_it_and_both_shapes() -> None:
    model = nn.Sequential(nn.Conv1d(2, 3, kernel_size=3, stride=2), nn.Flatten(), nn.Linear(9, 2))
    monitor = canonreg.CRHMonitor(model)
    x = torch.randn(4, 2, 8)  # conv rows: 4 × 3 positions; the mask: 4 × 8
    with monitor, masked(torch.ones(4, 8, dtype=torch.bool)):
        with pytest.raises(CanonRegError, match=r"Layer '0'.*\(4, 8\).*12 rows"):
            model(x)


def test_kept_rows_rules() -> None:
    dev = torch.device("cpu")
    assert kept_rows("l", 6, dev) is None  # no mask: every row
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(kept_rows("l", 10, dev, max_rows=4, generator=g1), torch.randperm(10, generator=g2)[:4])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    with masked(mask):
        assert kept_rows("l", 9, dev).tolist() == [0, 1, 6]  # per position
        assert kept_rows("l", 3, dev).tolist() == [0, 2]  # per sequence: the all-padding one is dropped
        with masked(torch.ones(3, 3)):
            assert kept_rows("l", 9, dev) is None  # innermost mask applies; all rows kept
        sub = kept_rows("l", 9, dev, max_rows=2, generator=torch.Generator().manual_seed(0))
        assert sub is not None and len(sub) == 2 and set(sub.tolist()) <= {0, 1, 6}
        with pytest.raises(CanonRegError, match=r"'l'.*\(3, 3\).*5 rows"):
            kept_rows("l", 5, dev)
    with masked(torch.zeros(2, 2, dtype=torch.bool)):
        assert kept_rows("l", 4, dev).numel() == 0
    with pytest.raises(ValueError, match="0/1"):
        with masked(torch.tensor([[0.0, float("-inf")]])):
            pass
    with pytest.raises(TypeError, match="`mask`"):
        with masked([1, 0]):  # type: ignore[arg-type]
            pass


def test_a_fully_masked_call_is_not_recorded() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    monitor = canonreg.CRHMonitor(model, on_missing="skip")
    x = torch.randn(2, 5, 3)
    with monitor:
        with masked(torch.zeros(2, 5)):
            model(x).square().sum().backward()
        with masked(torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])):
            model(x).square().sum().backward()
    report = monitor.compute(exponents=False, ranks=False)
    assert report.samples == {"0": 3, "2": 3}


@pytest.mark.parametrize("g_mode", ["exact", "ema"])
def test_masked_alignment_loss_equals_the_unpadded_per_sequence_reference(g_mode: str) -> None:
    model, ref, (x, mask, tokens, target, n_tokens) = _setup()
    loss = canonreg.AlignmentLoss(model, relations="all", preprocess="raw", metric="pearson", g_mode=g_mode, ema_decay=0.0)
    if g_mode == "ema":  # the G averages come from one masked backward pass of the task loss
        with masked(mask):
            task = _loss(model, x, mask, tokens, target, n_tokens)
        task.backward()
        model.zero_grad()
    with masked(mask):
        task = _loss(model, x, mask, tokens, target, n_tokens)
    value = loss(task)
    assert torch.isfinite(value)
    for name in LAYERS:
        for rel, (a, b) in canonreg.RELATION_PAIRS.items():
            expected = canonreg.functional.alignment(ref[name][a], ref[name][b], "pearson")
            got = loss.last_alignment[name][rel]
            assert_close(got.double(), expected, rtol=1e-7, atol=1e-9, msg=f"{name} {rel}")
    value.backward()  # differentiable through the kept rows
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    loss.detach()


def test_alignment_loss_refuses_a_fully_masked_call() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    loss = canonreg.AlignmentLoss(model, relations=("f-RWA",))
    x = torch.randn(2, 5, 3)
    with masked(torch.zeros(2, 5)), pytest.raises(CanonRegError, match="every position.*'0'.*masked out"):
        model(x)
    task = model(x).square().mean()  # outside the mask the loss works
    assert torch.isfinite(loss(task))
    loss.detach()


def test_measure_crh_ignore_index_equals_measuring_the_real_tokens_only() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    x, mask, tokens, _, lengths = _data()
    y = tokens.masked_fill(mask == 0, -100)

    def token_ce(out: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1), ignore_index=-100)

    got = canonreg.measure_crh(model, x, y, loss_fn=token_ce, ignore_index=-100, batch_size=2)
    real = mask.bool()
    ref = canonreg.measure_crh(model, x[real], tokens[real], batch_size=100)  # one row per real token
    padded = canonreg.measure_crh(model, x, y, loss_fn=token_ce, batch_size=2)
    for name in ("0", "2", "4"):
        assert got.samples[name] == ref.samples[name] == int(lengths.sum()) < padded.samples[name]
        for key, m in ref.matrices(name).items():
            assert_close(got.matrices(name)[key], m, rtol=1e-9, atol=1e-12, msg=f"{name} {key}")
    assert not torch.allclose(padded.matrices("0")["H_a"], ref.matrices("0")["H_a"], rtol=1e-3)
    with pytest.raises(TypeError, match="ignore_index"):
        canonreg.measure_crh(model, x, y, loss_fn=token_ce, ignore_index=-1.0)  # type: ignore[arg-type]


def test_gpt2_with_attention_mask_equals_its_unpadded_sequences_run_alone() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=30, n_positions=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(cfg).double()
    lengths = [6, 3, 5]
    ids = torch.randint(1, 30, (3, 6), generator=torch.Generator().manual_seed(2))
    mask = (torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    padded = canonreg.CRHMonitor(model)
    handle = mask_from_inputs(model)
    with padded:
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    handle.remove()
    alone = canonreg.CRHMonitor(model)  # the reference: every sequence by itself, no padding anywhere
    with alone:
        for i, n in enumerate(lengths):
            model(input_ids=ids[i : i + 1, :n], labels=ids[i : i + 1, :n]).loss.backward()
    got, ref = padded.compute(exponents=False, ranks=False), alone.compute(exponents=False, ranks=False)
    assert got.layers == ref.layers and len(got.layers) == 5
    for name in got.layers:
        assert got.samples[name] == ref.samples[name] == sum(lengths)
        for key, m in ref.matrices(name).items():
            # 1e-6: the HF causal-LM loss upcasts logits to float32, so G rows agree to ~1e-9 only
            assert_close(got.matrices(name)[key], m, rtol=1e-6, atol=1e-9, msg=f"{name} {key}")
    plain = canonreg.CRHMonitor(model)  # without the mask the padded positions count
    with plain:
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    unmasked = plain.compute(exponents=False, ranks=False)
    assert unmasked.samples["lm_head"] == ids.numel()
    assert not torch.allclose(unmasked.matrices("lm_head")["H_a"], ref.matrices("lm_head")["H_a"], rtol=1e-3)


def test_sequence_first_layers_take_the_batch_major_mask_row_by_row() -> None:
    """``nn.TransformerEncoderLayer(batch_first=False)``: its Linear layers see ``(positions, batch, features)``
    and flatten rows position-major, so the ``(batch, positions)`` mask is transposed for them (it was applied as
    is: linear1/linear2 kept the wrong rows, α off by 0.11, matrices by 40%). Equal to the batch-first twin."""
    torch.manual_seed(0)
    first = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True).double()
    seq = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=False).double()
    seq.load_state_dict(first.state_dict())
    x = torch.randn(3, 5, 8, dtype=torch.float64)  # (batch, positions, features)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    reports = []
    for model, inp in ((first, x), (seq, x.transpose(0, 1))):
        monitor = canonreg.CRHMonitor(model, preprocess="centered")
        with monitor, canonreg.masked(mask):
            out = model(inp, src_key_padding_mask=~mask)
            (out.square().sum() if model is first else out.transpose(0, 1).square().sum()).backward()
        reports.append(monitor.compute(exponents=False))
    assert reports[0].layers == reports[1].layers and "linear1" in reports[0].layers
    for layer in reports[0].layers:
        assert reports[1].samples[layer] == 10
        for k, v in reports[0].matrices(layer).items():
            got = reports[1].matrices(layer)[k]
            if k.startswith("G"):  # grad_scale="batch" reads the first dim, positions on sequence-first inputs
                got, v = got / got.abs().max(), v / v.abs().max()
            # the two layouts run attention in other kernels: equal to ~1e-9 of the scale (the defect was 40 %)
            torch.testing.assert_close(got, v, rtol=0, atol=1e-8 * float(v.abs().max()))
        for rel, a in reports[0].alignment[layer].items():
            assert reports[1].alignment[layer][rel] == pytest.approx(a, abs=1e-8)
