"""Built-in data for demos, recipes and tests — generated or shipped, never downloaded.

* :func:`mnist1d` — the MNIST-1D benchmark (Greydanus & Kobak, 2024) generated locally with the
  ``mnist1d`` package's own templates and transform (its download path is never used), with every
  generator argument (shift, scale, noise, shear…) overridable, and optional normalisation with
  another dataset's statistics so that transformed test sets live in the training input space.
* :func:`digits` — scikit-learn's bundled 8×8 digits.
* :func:`modular_addition` — the synthetic ``(a + b) mod p`` sequence task.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["Split", "mnist1d", "mnist1d_args", "digits", "modular_addition"]


@dataclass(frozen=True)
class Split:
    """A train/test split of float features and integer labels, plus the normalisation used."""

    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor
    mean: float
    std: float

    @property
    def num_features(self) -> int:
        return int(self.x.shape[-1])

    @property
    def num_classes(self) -> int:
        return int(torch.cat([self.y, self.y_test]).max().item()) + 1


def mnist1d_args(**overrides: object) -> dict[str, object]:
    """The mnist1d generator arguments (``get_dataset_args``) with ``overrides`` applied.

    Keys: ``num_samples, train_split, template_len, padding, scale_coeff, max_translation,
    corr_noise_scale, iid_noise_scale, shear_scale, shuffle_seq, final_seq_length, seed``.
    """
    try:
        from mnist1d.data import get_dataset_args
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("mnist1d is not installed: pip install 'canonreg[recipes]'") from e
    args = dict(get_dataset_args().__dict__)
    args.pop("url", None)
    for k, v in overrides.items():
        if k not in args:
            raise ValueError(f"Expected mnist1d argument names from {sorted(args)}, but got {k!r}")
        args[k] = v
    return args


def mnist1d(
    num_samples: int = 5000,
    seed: int = 42,
    *,
    normalize_with: tuple[float, float] | None = None,
    **overrides: object,
) -> Split:
    """Generate MNIST-1D locally with the package's own generator (no download).

    Reproduces ``mnist1d.data.make_dataset`` sample for sample, except that the normalisation
    ``x ← (x − mean) / std`` may use given statistics: pass a training split's ``(mean, std)`` to
    express a regenerated, more strongly transformed test set in the same input space.

    Generation takes a few seconds per 5000 samples, so results are cached on disk under
    ``$CANONREG_CACHE_DIR`` (default ``~/.cache/canonreg``), keyed by every argument; set
    ``CANONREG_CACHE_DIR=off`` to disable.

    Args:
        num_samples: total samples (train + test, split by ``train_split``).
        seed: generator seed.
        normalize_with: ``(mean, std)`` to normalise with, instead of this dataset's own.
        **overrides: any mnist1d generator argument, e.g. ``max_translation=60, iid_noise_scale=0.1``.
    """
    args_dict = mnist1d_args(num_samples=num_samples, seed=seed, **overrides)
    key = json.dumps({"args": args_dict, "normalize_with": normalize_with, "v": 1}, sort_keys=True, default=str)
    cache = _cache_path("mnist1d-" + hashlib.sha256(key.encode()).hexdigest()[:20] + ".pt")
    if cache is not None and cache.exists():
        try:
            d = torch.load(cache, weights_only=True)
            return Split(d["x"], d["y"], d["x_test"], d["y_test"], float(d["mean"]), float(d["std"]))
        except Exception:  # a corrupt cache entry is regenerated
            pass
    split = _generate_mnist1d(args_dict, normalize_with)
    if cache is not None:
        _atomic_save(cache, {"x": split.x, "y": split.y, "x_test": split.x_test, "y_test": split.y_test, "mean": split.mean, "std": split.std})
    return split


def _cache_path(name: str) -> Path | None:
    root = os.environ.get("CANONREG_CACHE_DIR", str(Path.home() / ".cache" / "canonreg"))
    if root.lower() == "off":
        return None
    return Path(root) / name


def _atomic_save(path: Path, obj: object) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError:  # an unwritable cache only costs time
        pass


def _generate_mnist1d(args_dict: dict[str, object], normalize_with: tuple[float, float] | None) -> Split:
    from mnist1d.data import get_templates
    from mnist1d.transform import transform
    from mnist1d.utils import ObjectView, set_seed

    args = ObjectView(dict(args_dict))
    templates = get_templates()
    set_seed(args.seed)
    xs, ys = [], []
    per_class = args.num_samples // len(templates["y"])
    for label in range(len(templates["y"])):
        for _ in range(per_class):
            x, _t = transform(templates["x"][label], templates["t"], args)
            xs.append(x)
            ys.append(templates["y"][label])
    perm = np.random.permutation(len(ys))
    xa = np.stack(xs)[perm]
    ya = np.stack(ys)[perm]
    if args.shuffle_seq:
        xa = xa[..., np.random.permutation(args.final_seq_length)]
    mean, std = (float(xa.mean()), float(xa.std())) if normalize_with is None else normalize_with
    xa = (xa - mean) / std
    split = int(len(ya) * args.train_split)
    xt = torch.as_tensor(xa, dtype=torch.float32)
    yt = torch.as_tensor(ya, dtype=torch.long)
    return Split(xt[:split], yt[:split], xt[split:], yt[split:], mean, std)


def digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's bundled 8×8 digits (1797 samples, 64 features), standardised per dataset."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.data, dtype=torch.float32)
    y = torch.as_tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    mean, std = float(x.mean()), float(x.std())
    x = (x - mean) / std
    k = int(len(y) * (1 - test_fraction))
    return Split(x[:k], y[:k], x[k:], y[k:], mean, std)


def modular_addition(p: int = 23, train_fraction: float = 0.5, seed: int = 0) -> Split:
    """All pairs ``(a, b)`` as token sequences ``[a, b, p]`` (``p`` = the '=' token), label ``(a+b) mod p``.

    ``x`` holds token ids (as float32 for the Split type; cast with ``.long()``).
    """
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    x = torch.stack([a.reshape(-1), b.reshape(-1), torch.full((p * p,), p)], dim=1)
    y = (x[:, 0] + x[:, 1]) % p
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(p * p, generator=g)
    x, y = x[perm], y[perm]
    k = int(p * p * train_fraction)
    return Split(x[:k].float(), y[:k], x[k:].float(), y[k:], 0.0, 1.0)
