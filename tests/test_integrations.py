"""Integrations: GPT-2's Conv1D through the tap contract, flat metric keys, Lightning and HF callbacks.

Frameworks are optional: each test skips (pytest.importorskip) when its package is absent. Models are
built from configs (nothing is downloaded). torchvision and timm are deliberately not used.
"""

from __future__ import annotations

import copy
import csv
import importlib
import math
import pickle
import posixpath
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import conv1d_and_linear_twins
from torch import nn
from torch.testing import assert_close

import canonreg
from canonreg import CanonRegError
from canonreg.integrations import flat_metrics, metric_key
from canonreg.taps import TransposedLinearTap, default_taps, get_tap, matrix_view, to_weight_layout, weight_parameter

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


# ----------------------------------------------------------------------------- lazy imports
def test_importing_canonreg_imports_no_framework() -> None:
    code = "import sys, canonreg, canonreg.integrations; print(sorted(m for m in ('transformers', 'lightning', 'pytorch_lightning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "module,blocked,extra",
    [
        ("canonreg.integrations.lightning", ("lightning", "lightning.pytorch", "pytorch_lightning"), "lightning"),
        ("canonreg.integrations.hf", ("transformers",), "hf"),
    ],
)
def test_missing_framework_raises_importerror_naming_the_extra(monkeypatch, module, blocked, extra) -> None:
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=re.escape(f"pip install 'canonreg[{extra}]'")):
        importlib.import_module(module)


# ----------------------------------------------------------------------------- flat metrics
def _mlflow_accepts(key: str) -> bool:
    """MLflow's metric-name rule, restated: [\\w/.\\- ] only, and normpath must leave the name unchanged."""
    if not re.fullmatch(r"[/\w.\- ]*", key):
        return False
    norm = posixpath.normpath(key)
    return norm == key and norm != "." and not norm.startswith("..") and not norm.startswith("/")


def _tensorboard_clean(key: str) -> str:
    """TensorBoard's tag cleaning: characters outside [-/\\w.] become '_' (a valid tag is unchanged)."""
    return re.sub(r"[^-/\w\.]", "_", key)


class OddNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({"in proj": nn.Linear(4, 6), "in_proj": nn.Linear(6, 6), "<q>/k": nn.Linear(6, 3)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.blocks.values():
            x = torch.tanh(m(x))
        return x


@pytest.fixture(scope="module")
def odd_report() -> canonreg.CRHReport:
    torch.manual_seed(0)
    model = OddNames().double()
    with canonreg.CRHMonitor(model) as monitor:
        for _ in range(2):
            x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
        return monitor.compute(exponents=True, n_bootstrap=0)


def test_flat_metric_keys_are_accepted_by_mlflow_tensorboard_and_wandb(odd_report) -> None:
    metrics = flat_metrics(odd_report, prefix="train/crh")
    assert metrics and all(isinstance(v, float) for v in metrics.values())
    for key in metrics:
        assert re.fullmatch(r"[A-Za-z0-9_./-]+", key), key  # no '<', '>', spaces
        assert _mlflow_accepts(key), key
        assert _tensorboard_clean(key) == key, key
        assert key.split("/")[0] == "train" and "" not in key.split("/")  # W&B groups by the first segment
    # MLflow's file store keeps a metric at its key's path: no key may be a directory of another
    keys = sorted(metrics)
    assert not any(b.startswith(a + "/") for a, b in zip(keys, keys[1:]))
    # an independent check that the validator restated above rejects what it must
    for bad in ("crh/alpha/<root>/f-RGA", "crh//x", "/crh", "crh/../x", "crh/a<b"):
        assert not (_mlflow_accepts(bad) and _tensorboard_clean(bad) == bad)


def test_flat_metrics_values_and_names(odd_report) -> None:
    m = flat_metrics(odd_report)
    names = {"blocks.in proj": "blocks.in_proj", "blocks.in_proj": "blocks.in_proj_2", "blocks.<q>/k": "blocks._q__k"}
    assert set(odd_report.layers) == set(names)
    for layer, seg in names.items():
        for rel in canonreg.RELATIONS:
            assert m[f"crh/alpha/{seg}/{rel}"] == odd_report.alignment[layer][rel]
            assert m[f"crh/kappa/{seg}/{rel}"] == odd_report.exponents[layer][rel].exponent
        assert m[f"crh/samples/{seg}"] == odd_report.samples[layer] == 64
    values = [odd_report.alignment[n][r] for n in names for r in canonreg.RELATIONS]
    assert m["crh/alpha_mean/all"] == pytest.approx(sum(values) / len(values))
    assert m["crh/alpha_min/all"] == min(values)
    for rel in canonreg.RELATIONS:
        assert m[f"crh/alpha_mean/{rel}"] == pytest.approx(sum(odd_report.alignment[n][rel] for n in names) / 3)
    assert odd_report.to_flat_dict("train/crh") == flat_metrics(odd_report, "train/crh")
    assert metric_key("crh", "", "..", "a b") == "crh/root/_/a_b"
    with pytest.raises(ValueError, match="`prefix`"):
        flat_metrics(odd_report, prefix="crh/")
    with pytest.raises(ValueError, match="`prefix`"):
        flat_metrics(odd_report, prefix="a b")
    with pytest.raises(TypeError, match="`report`"):
        flat_metrics({"alignment": {}})  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- GPT-2 Conv1D
def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg)


CONV1D_NAMES = [f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def test_gpt2_conv1d_layers_are_measured_and_match_a_dense_reference() -> None:
    model = _tiny_gpt2().double()
    from transformers.pytorch_utils import Conv1D

    assert Conv1D in default_taps() and isinstance(get_tap(model.transformer.h[0].attn.c_attn), TransposedLinearTap)
    rows: dict[str, dict[str, list[torch.Tensor]]] = {n: {"x": [], "y": [], "gx": [], "gy": []} for n in CONV1D_NAMES}

    def capture(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0]
            rows[name]["x"].append(x.detach().reshape(-1, x.shape[-1]))
            rows[name]["y"].append(output.detach().reshape(-1, output.shape[-1]))
            x.register_hook(lambda g: rows[name]["gx"].append(g.reshape(-1, g.shape[-1])))
            output.register_hook(lambda g: rows[name]["gy"].append(g.reshape(-1, g.shape[-1])))

        return hook

    handles = [model.get_submodule(n).register_forward_hook(capture(n)) for n in CONV1D_NAMES]
    ids = torch.randint(0, 50, (3, 2, 8), generator=torch.Generator().manual_seed(1))
    monitors = {
        "direct": canonreg.CRHMonitor(model, preprocess="raw", identities=False, grad_scale="none"),
        "identities": canonreg.CRHMonitor(model, preprocess="raw", grad_scale="none"),
    }
    reports = {}
    for kind, monitor in monitors.items():
        assert list(monitor.layers) == [*CONV1D_NAMES, "lm_head"]
        assert {"transformer.wte", "transformer.wpe", "transformer.ln_f"} <= set(monitor.excluded)
        with monitor:
            for batch in ids:
                model.zero_grad()
                model(input_ids=batch, labels=batch).loss.backward()
        reports[kind] = monitor.compute(exponents=False)
    for h in handles:
        h.remove()
    for name in CONV1D_NAMES:
        module = model.get_submodule(name)
        weight, bias = module.weight.detach(), module.bias.detach()  # weight stored (d_a, d_b): W = weightᵀ
        cat = {k: torch.cat(v) for k, v in rows[name].items()}
        n = cat["x"].shape[0] // 2  # each monitor saw one of the two identical passes
        assert n == 3 * 2 * 8
        ref = {
            "H_a": cat["x"][:n].T @ cat["x"][:n] / n,
            "H_b": cat["y"][:n].T @ cat["y"][:n] / n,
            "G_a": cat["gx"][:n].T @ cat["gx"][:n] / n,
            "G_b": cat["gy"][:n].T @ cat["gy"][:n] / n,
            "Z_a": weight @ weight.T,
            "Z_b": weight.T @ weight,
        }
        # the layout: h_b = W h_a + b with W = weightᵀ, so H_b = W H_a Wᵀ + W μ bᵀ + b μᵀ Wᵀ + b bᵀ in raw mode
        mu = cat["x"][:n].mean(0)
        w = weight.T
        assert_close(ref["H_b"], w @ ref["H_a"] @ w.T + torch.outer(w @ mu, bias) + torch.outer(bias, w @ mu) + torch.outer(bias, bias))
        for kind, report in reports.items():
            got = report.matrices(name)
            for key, expected in ref.items():
                assert_close(got[key], expected, rtol=1e-9, atol=1e-12, msg=f"{kind} {name} {key}")


def test_gpt2_conv1d_weight_layout_for_the_noise_wrapper() -> None:
    model = _tiny_gpt2()
    layer = model.transformer.h[0].mlp.c_fc
    tap = get_tap(layer)
    assert tap is not None and weight_parameter(tap, layer) is layer.weight
    assert tap.weight(layer).shape == (layer.nf, layer.weight.shape[0])  # (d_b, d_a)
    noise = torch.randn(tap.weight(layer).shape)
    into_grad = to_weight_layout(tap, layer, noise)
    assert into_grad.shape == layer.weight.shape and torch.equal(into_grad, noise.T)
    grad = torch.zeros_like(layer.weight)
    matrix_view(tap, layer, grad).add_(noise)  # writing the (d_b, d_a) view reaches the gradient
    assert torch.equal(grad, noise.T)
    assert not torch.equal(noise.reshape(layer.weight.shape), noise.T)  # a reshape would scramble it


# ----------------------------------------------------------------------------- Lightning
def _lightning():
    return pytest.importorskip("lightning.pytorch")


def _data(n: int = 64):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def _make_lit(pl):
    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
            self.penalties: list[float] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            from canonreg.integrations.lightning import alignment_penalty

            x, y = batch
            task = F.cross_entropy(self(x), y)
            penalty = alignment_penalty(self, task)
            self.penalties.append(float(penalty.detach()))
            return task + penalty

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Lit()


def _trainer(pl, tmp_path, callbacks, max_steps: int = 4):
    from lightning.pytorch.loggers import CSVLogger

    return pl.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=CSVLogger(tmp_path), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )


def test_lightning_callback_logs_windows_and_final_measurement(tmp_path) -> None:
    pl = _lightning()
    from canonreg.integrations.lightning import CRHCallback

    loader = _data()
    module = _make_lit(pl)
    cb = CRHCallback(every_n_steps=2, measure_at_end=loader)
    trainer = _trainer(pl, tmp_path, [cb])
    trainer.fit(module, loader)

    # reference: the same training written as a plain loop with a monitor reset every 2 steps
    ref_model = _make_lit(pl)
    opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    windows = {}
    with canonreg.CRHMonitor(ref_model) as monitor:
        for step, (x, y) in enumerate(loader, start=1):
            opt.zero_grad()
            F.cross_entropy(ref_model(x), y).backward()
            opt.step()
            if step % 2 == 0:
                windows[step] = flat_metrics(monitor.compute(exponents=False))
                monitor.reset()
    for p, q in zip(module.parameters(), ref_model.parameters()):
        assert_close(p, q)  # the callback did not change training
    final_ref = flat_metrics(canonreg.measure_crh(ref_model, loader), "crh_final")

    with open(trainer.logger.experiment.metrics_file_path) as f:
        logged = list(csv.DictReader(f))
    by_step: dict[int, dict[str, float]] = {}
    for row in logged:
        by_step.setdefault(int(row["step"]), {}).update({k: float(v) for k, v in row.items() if v not in ("", None) and k != "step"})
    for step, expected in windows.items():
        got = {k: v for k, v in by_step[step].items() if k.startswith("crh/")}
        assert set(got) == set(expected)
        for k, v in expected.items():
            assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9, nan_ok=True), k
    got_final = {k: v for k, v in by_step[4].items() if k.startswith("crh_final/")}
    assert set(got_final) == set(final_ref)
    for k, v in final_ref.items():
        assert got_final[k] == pytest.approx(v, rel=1e-6, abs=1e-9, nan_ok=True), k
    assert cb.final_metrics == pytest.approx(final_ref, nan_ok=True)

    # nothing of canonreg stays on the module: no hooks, copyable, picklable
    assert cb.monitor is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())
    copy.deepcopy(module)
    pickle.loads(pickle.dumps(module.net))


def test_lightning_callback_mask_key_drops_padding(tmp_path) -> None:
    pl = _lightning()
    from canonreg.integrations.lightning import CRHCallback

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 5, 6, generator=g), torch.randint(0, 3, (32, 5), generator=g)
    mask = (torch.arange(5)[None, :] < torch.randint(1, 6, (32,), generator=g)[:, None]).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, mask), batch_size=8)

    class TokenLit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            from canonreg.integrations.lightning import alignment_penalty

            xb, yb, mb = batch
            ce = F.cross_entropy(self(xb, attention_mask=mb).transpose(1, 2), yb, reduction="none")
            task = (ce * mb).sum() / mb.sum()
            return task + alignment_penalty(self, task)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    counts = {}
    for key in ("attention_mask", None):
        cb = CRHCallback(every_n_steps=4, mask_key=key, align={"relations": ("f-RWA",), "weight": 0.1})
        lit = TokenLit()
        _trainer(pl, tmp_path / str(key), [cb], max_steps=4).fit(lit, loader)
        assert cb.last_report is not None and cb.monitor is None and cb._mask_handle is None
        assert not lit._forward_pre_hooks and not lit._forward_hooks
        counts[key] = cb.last_metrics["crh/samples/net.0"]
    assert counts["attention_mask"] == int(mask.sum()) < counts[None] == mask.numel()  # one epoch, every sequence once
    with pytest.raises(TypeError, match="`mask_key`"):
        CRHCallback(every_n_steps=4, mask_key="")


def test_lightning_gradient_accumulation_windows_match_a_plain_loop(tmp_path) -> None:
    pl = _lightning()
    from lightning.pytorch.loggers import CSVLogger

    from canonreg.integrations.lightning import CRHCallback

    loader = _data()
    module = _make_lit(pl)
    cb = CRHCallback(every_n_steps=2)
    trainer = pl.Trainer(
        max_steps=4, accumulate_grad_batches=2, accelerator="cpu", logger=CSVLogger(tmp_path), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    assert not [w for w in caught if "gradient accumulation" in str(w.message)]

    # reference: two micro-batches per step, each loss / 2, monitor told so; window of 2 steps = 4 batches
    ref_model = _make_lit(pl)
    opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    batches = [b for _ in range(2) for b in loader]
    with canonreg.CRHMonitor(ref_model, accumulation=2) as monitor:
        for i, (x, y) in enumerate(batches, start=1):
            (F.cross_entropy(ref_model(x), y) / 2).backward()
            if i % 2 == 0:
                opt.step()
                opt.zero_grad()
            if i % 4 == 0:
                expected = monitor.compute(exponents=False)
                monitor.reset()
    assert cb.last_report is not None
    for layer in expected.layers:
        got, want = cb.last_report.matrices(layer), expected.matrices(layer)
        for key in want:
            assert_close(got[key], want[key], msg=f"{layer} {key}")
    assert cb.last_report.samples == expected.samples == {"net.0": 64, "net.2": 64}


def test_lightning_alignment_wiring_and_lr_find(tmp_path) -> None:
    pl = _lightning()
    from lightning.pytorch.tuner import Tuner

    from canonreg.integrations.lightning import CRHCallback, alignment_penalty

    loader = _data()
    plain = _make_lit(pl)
    _trainer(pl, tmp_path / "plain", [CRHCallback(every_n_steps=2)]).fit(plain, loader)
    wired = _make_lit(pl)
    cb = CRHCallback(every_n_steps=2, align={"relations": ["f-RWA"], "weight": 0.5})
    trainer = _trainer(pl, tmp_path / "wired", [cb])
    Tuner(trainer).lr_find(wired, train_dataloaders=loader, num_training=3, min_lr=1e-3, max_lr=1e-2, update_attr=False)
    assert cb.monitor is None and cb.align is None  # lr_find's inner fit attached and detached cleanly
    wired.penalties.clear()
    trainer.fit(wired, loader)
    assert wired.penalties and all(p > 0 for p in wired.penalties)  # the wired loss acted in every step
    assert all(p == 0 for p in plain.penalties)  # without `align=` the helper is an exact zero
    assert float(alignment_penalty(wired, torch.tensor(2.0))) == 0.0  # outside fit: zero
    with pytest.raises(ValueError, match="`every_n_steps`"):
        CRHCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="both are None"):
        CRHCallback(every_n_steps=None)
    with pytest.raises(ValueError, match="`prefix`"):
        CRHCallback(prefix="crh alpha")
    # checked when made, not after the whole fit (measure_at_end=5 failed at the end: 'int' is not iterable)
    with pytest.raises(TypeError, match="`measure_at_end`"):
        CRHCallback(measure_at_end=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`align`.*\['relationz'\]"):
        CRHCallback(every_n_steps=2, align={"relationz": ("f-RWA",)})
    with pytest.raises(TypeError, match=r"`measure_kwargs`.*\['y'\]"):
        CRHCallback(measure_at_end=[], measure_kwargs={"y": None})


# ----------------------------------------------------------------------------- Hugging Face Trainer
class _TokenData(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, 50, (16, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_hf_trainer_callback_metrics_reach_report_to(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from canonreg.integrations.hf import CRHTrainerCallback

    class Reporter(transformers.TrainerCallback):
        """Stands for a report_to integration: those receive exactly the `on_log` events."""

        def __init__(self) -> None:
            self.logs: list[dict[str, float]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    reporter = Reporter()
    try:  # the real report_to path too, when TensorBoard is installed (it is in the `test` extra)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        EventAccumulator = None
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, use_cpu=True,
        report_to=["tensorboard"] if EventAccumulator is not None else [],
        save_strategy="no", disable_tqdm=True, logging_steps=1000, seed=0,
    )
    trainer = transformers.Trainer(model=_tiny_gpt2(), args=args, train_dataset=_TokenData(), callbacks=[reporter])
    trainer.remove_callback(transformers.PrinterCallback)
    cb = CRHTrainerCallback.add_to(trainer, every_n_steps=2)
    trainer.train()
    crh_logs = [log for log in reporter.logs if "crh/alpha_mean/all" in log]
    assert len(crh_logs) == 2  # steps 2 and 4
    assert crh_logs[-1] == {**cb.last_metrics, "epoch": crh_logs[-1]["epoch"]}
    history = [h for h in trainer.state.log_history if "crh/alpha_mean/all" in h]
    assert [h["step"] for h in history] == [2, 4]
    layers = [*CONV1D_NAMES, "lm_head"]
    assert cb.last_report is not None and cb.last_report.layers == layers
    for name in layers:  # tokens are samples: 2 steps × 4 sequences × 8 positions per window
        assert crh_logs[-1][f"crh/samples/{name}"] == 64.0
        assert all(-1 <= crh_logs[-1][f"crh/alpha/{name}/{r}"] <= 1 for r in canonreg.RELATIONS)
    assert cb.monitor is None and all(not m._forward_hooks for m in trainer.model.modules())
    if EventAccumulator is not None:  # TensorBoardCallback (report_to) wrote them, as train/<key>
        events = sorted(tmp_path.rglob("events.out.tfevents.*"))
        assert events
        acc = EventAccumulator(str(events[0].parent))
        acc.Reload()
        scalars = acc.Scalars("train/crh/alpha_mean/all")
        assert [e.step for e in scalars] == [2, 4]
        assert scalars[-1].value == pytest.approx(cb.last_metrics["crh/alpha_mean/all"], rel=1e-6)
        assert f"train/crh/alpha/{CONV1D_NAMES[0]}/f-RGA" in acc.Tags()["scalars"]


class _PaddedTokenData(torch.utils.data.Dataset):
    """8 right-padded sequences (lengths 3..8) with their attention_mask; padding labels are -100."""

    def __init__(self) -> None:
        self.ids = torch.randint(1, 50, (8, 8), generator=torch.Generator().manual_seed(0))
        self.mask = (torch.arange(8)[None, :] < torch.tensor([8, 3, 5, 8, 4, 6, 7, 3])[:, None]).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i].masked_fill(self.mask[i] == 0, 0)
        return {"input_ids": ids, "attention_mask": self.mask[i], "labels": ids.masked_fill(self.mask[i] == 0, -100)}


@pytest.mark.parametrize("mask_key", ["attention_mask", None])
def test_hf_trainer_callback_does_not_count_padding(tmp_path, mask_key) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from canonreg.integrations.hf import CRHTrainerCallback

    data = _PaddedTokenData()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, use_cpu=True, report_to=[],
        save_strategy="no", disable_tqdm=True, logging_steps=1000, seed=0,
    )
    trainer = transformers.Trainer(model=_tiny_gpt2(), args=args, train_dataset=data)
    cb = CRHTrainerCallback.add_to(trainer, every_n_steps=2, mask_key=mask_key)
    trainer.train()
    expected = int(data.mask.sum()) if mask_key else data.mask.numel()  # one epoch: every sequence once
    assert int(data.mask.sum()) < data.mask.numel()
    assert cb.last_report is not None
    for name in [*CONV1D_NAMES, "lm_head"]:
        assert cb.last_metrics[f"crh/samples/{name}"] == expected
    assert cb.monitor is None and all(not m._forward_hooks and not m._forward_pre_hooks for m in trainer.model.modules())


def test_hf_callback_needs_its_trainer() -> None:
    pytest.importorskip("transformers")
    from canonreg.integrations.hf import CRHTrainerCallback

    with pytest.raises(CanonRegError, match=r"add_to\(trainer"):
        CRHTrainerCallback(every_n_steps=2).on_train_begin(None, None, None, model=nn.Linear(2, 2))
    with pytest.raises(TypeError, match="`trainer`"):
        CRHTrainerCallback(object())
    with pytest.raises(ValueError, match="`every_n_steps`"):
        CRHTrainerCallback(every_n_steps=0)
    # keyword options are checked when the callback is made, not at the first window of a run
    with pytest.raises(TypeError, match=r"`compute_kwargs`.*\['bogus'\]"):
        CRHTrainerCallback(every_n_steps=2, compute_kwargs={"bogus": 1})
    with pytest.raises(TypeError, match=r"`monitor_kwargs`.*\['layers'\]"):
        CRHTrainerCallback(every_n_steps=2, monitor_kwargs={"layers": ["0"]})


def test_hf_callback_removes_its_hooks_when_the_run_fails(tmp_path) -> None:
    """A Trainer run that raises never reaches on_train_end: the hooks stayed, and a new callback on the same model
    was refused ("a CRHMonitor is already attached")."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from canonreg.integrations.hf import CRHTrainerCallback

    class Boom(transformers.TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            raise RuntimeError("boom")

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, use_cpu=True, report_to=[],
        save_strategy="no", disable_tqdm=True, logging_steps=1000, seed=0,
    )
    model = _tiny_gpt2()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_TokenData())
    cb = CRHTrainerCallback.add_to(trainer, every_n_steps=2)
    trainer.add_callback(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert cb.monitor is None and all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    again = transformers.Trainer(model=model, args=args, train_dataset=_TokenData())
    CRHTrainerCallback.add_to(again, every_n_steps=2)
    again.train()


# ----------------------------------------------------------------------------- Conv1D vs its nn.Linear twin
def _conv1d_and_linear_twins() -> tuple[nn.Module, nn.Module]:
    pytest.importorskip("transformers")
    return conv1d_and_linear_twins(4, 8, 3)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g)


def test_conv1d_monitor_and_alignment_loss_agree_with_the_linear_twin() -> None:
    conv, lin = _conv1d_and_linear_twins()
    x, y = _batch()
    reports = []
    for model in (conv, lin):
        with canonreg.CRHMonitor(model) as monitor:
            F.cross_entropy(model(x).reshape(-1, 3), y).backward()
        reports.append(monitor.compute(exponents=False))
    for c in ("0", "2"):
        for key, value in reports[1].matrices(c).items():
            assert_close(reports[0].matrices(c)[key], value, msg=key)
    # the loss (separately: a monitor would also see the loss's own gradient) in each layout
    losses = []
    for model in (conv, lin):
        model.zero_grad()
        align = canonreg.AlignmentLoss(model, relations="all", weight=1.0)
        task = F.cross_entropy(model(x).reshape(-1, 3), y)
        loss = align(task)
        loss.backward()
        align.detach()
        losses.append(loss.detach())
    assert_close(losses[0], losses[1])
    for c in (0, 2):
        assert_close(conv[c].weight.grad, lin[c].weight.grad.T)
        assert_close(conv[c].bias.grad, lin[c].bias.grad)


def test_conv1d_noise_equals_the_linear_twin_transposed() -> None:
    conv, lin = _conv1d_and_linear_twins()
    x, y = _batch()
    for model in (conv, lin):
        opt = canonreg.NoiseCalibrated(torch.optim.SGD(model.parameters(), lr=0.1), model, noise=1.0, sketch=None, seed=0)
        F.cross_entropy(model(x).reshape(-1, 3), y).backward()
        opt.step()
        opt.detach()
    for c in (0, 2):
        assert_close(conv[c].weight, lin[c].weight.T)


# ----------------------------------------------------------------------------- run_trial with your data; Optuna
def _user_split(n: int, seed: int = 0) -> canonreg.data.Split:
    from canonreg.data import Split

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 3, generator=g)
    x, x_test = torch.randn(n, 8, generator=g), torch.randn(64, 8, generator=g)
    return Split(x, (x @ w).argmax(1), x_test, (x_test @ w).argmax(1), 0.0, 1.0)


def _user_model(cfg) -> nn.Module:
    return nn.Sequential(nn.Linear(8, cfg.width), nn.Tanh(), nn.Linear(cfg.width, cfg.width), nn.Tanh(), nn.Linear(cfg.width, 3))


def test_run_trial_checks_batch_size_against_the_data_it_trains_on() -> None:
    from canonreg.experiment import TrialConfig, run_trial

    # 1600 > the 1437 training rows of the built-in digits: fine with your own 2000 rows
    cfg = TrialConfig(dataset="digits", width=8, depth=3, batch_size=1600, steps=2, eval_every=1, n_bootstrap=0)
    result = run_trial(cfg, data=lambda c: _user_split(2000), model_fn=_user_model, threads=1)
    assert result["layers"] == ["0", "2", "4"] and math.isfinite(result["train_loss"])
    with pytest.raises(ValueError, match=r"`batch_size` <= the 100 training samples of your `data`, but got 1600"):
        run_trial(cfg, data=_user_split(100), model_fn=_user_model)
    pytest.importorskip("sklearn", reason="the built-in digits need scikit-learn")
    with pytest.raises(ValueError, match=r"`batch_size` <= the 1437 training samples of 'digits', but got 1600"):
        run_trial(cfg, model_fn=_user_model)


def test_optuna_study_over_run_trial_with_your_model_and_data(tmp_path) -> None:
    optuna = pytest.importorskip("optuna")
    from canonreg.experiment import TrialConfig, run_trial

    split = _user_split(256)
    seen: list[dict] = []

    def objective(trial) -> float:  # the example of docs/integrations.md, at test size
        cfg = TrialConfig(
            arm="loss", width=8, depth=3, batch_size=32, steps=8, eval_every=4, n_bootstrap=0, seed=trial.number,
            lr=trial.suggest_float("lr", 1e-3, 1e-1, log=True),
            loss_weight=trial.suggest_float("loss_weight", 0.01, 1.0, log=True),
        )
        result = run_trial(cfg, data=split, model_fn=_user_model, threads=1)
        trial.set_user_attr("min_alpha_inner", result["min_alpha_inner"])
        seen.append(result)
        return result["test_acc"]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(objective, n_trials=2)
    assert len(study.trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    for t, r in zip(study.trials, seen):
        assert r["config"]["lr"] == pytest.approx(t.params["lr"]) and r["config"]["loss_weight"] == pytest.approx(t.params["loss_weight"])
        assert t.value == r["test_acc"] and t.user_attrs["min_alpha_inner"] == r["min_alpha_inner"]
        assert r["layers"] == ["0", "2", "4"] and r["threads"] == 1
    assert study.best_value == max(r["test_acc"] for r in seen)


def test_mask_from_inputs_on_an_encoder_decoder_masks_the_encoder_positions_only() -> None:
    """T5 built from a config: the ``attention_mask`` is the encoder's; the decoder (another sequence, here of
    another length) runs unmasked. The root-level mask was applied to the decoder layers too: an error for
    another length, wrong rows (α off by 0.12) for the same length."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)  # fmt: skip
    model = transformers.T5ForConditionalGeneration(cfg).double()
    ids = torch.randint(1, 40, (3, 6), generator=torch.Generator().manual_seed(1))
    enc_mask = (torch.arange(6)[None] < torch.tensor([6, 2, 4])[:, None]).long()
    labels = torch.randint(1, 40, (3, 4), generator=torch.Generator().manual_seed(2))
    monitor = canonreg.CRHMonitor(model, preprocess="centered")
    handle = canonreg.mask_from_inputs(model)
    with monitor:
        model(input_ids=ids * enc_mask, attention_mask=enc_mask, labels=labels).loss.backward()
    handle.remove()
    report = monitor.compute(exponents=False, ranks=False)
    assert report.samples["encoder.block.0.layer.1.DenseReluDense.wi"] == 12  # the real encoder tokens
    assert report.samples["decoder.block.0.layer.2.DenseReluDense.wi"] == 12  # every decoder position (3 × 4)
    assert report.samples["decoder.block.0.layer.1.EncDecAttention.q"] == 12
