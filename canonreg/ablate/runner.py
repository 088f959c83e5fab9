"""Running an ablation: trials in worker processes (spawn) or Ray tasks, interrupt-safe, resumable."""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..experiment import TrialConfig, config_id, scalar_metrics
from ..stats import environment, progress_bar
from ..writers import CSVWriter, TensorBoardWriter
from .measure import bound_measure, measure_args_json, resolve_measure
from .spec import BACKENDS, AblationSpec, Backend, load_spec
from .store import _append_line, load_results
from .tables import write_summaries


def _execute(cfg_dict: dict[str, Any], log_kind: str, log_dir: str | None, measure: MeasureCall | None = None) -> dict[str, Any]:
    """Run one trial (in a worker process, a Ray task or in-process), with the measurement ``measure``
    (``{"function", "args"}``, see :mod:`canonreg.ablate.measure`) if given; never raises.

    Returns ``{"run_id", "result"}`` (the measurement under ``result["measure"]``) or
    ``{"run_id", "error", "traceback"}``.
    """
    from ..experiment import run_trial

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = TrialConfig.from_dict(cfg_dict)
    rid = config_id(cfg)
    writer: CSVWriter | TensorBoardWriter | None = None
    try:
        if log_kind != "none" and log_dir is not None:
            shutil.rmtree(log_dir, ignore_errors=True)  # a previous, interrupted attempt
            fields = {"run_id": rid, "arm": cfg.arm, "seed": cfg.seed}
            if log_kind == "csv":
                writer = CSVWriter(Path(log_dir) / "metrics.csv", fields=fields, append=False)
            else:
                writer = TensorBoardWriter(log_dir)
        callback = writer.log_event if writer is not None else None
        fn = None if measure is None else bound_measure(measure["function"], measure["args"])
        result = run_trial(cfg, callback=callback, measure=fn)
        return {"run_id": rid, "result": result}
    except Exception as e:  # reported to the parent, recorded in errors.jsonl
        return {"run_id": rid, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    finally:
        if writer is not None:
            writer.close()
        torch.set_num_threads(threads)


def _init_worker(parent: int | None = None) -> None:
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    if parent is not None:
        threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True, name="canonreg-orphan-watch").start()


def _exit_when_orphaned(parent: int, period: float = 0.5) -> None:
    """End this worker process as soon as its parent is gone (killed with a signal it cannot catch)."""
    while True:
        time.sleep(period)
        if os.getppid() != parent:
            os._exit(1)


class Terminated(SystemExit):
    """Raised in the runner's main thread on SIGTERM, so that workers are stopped before it exits.

    A ``SystemExit`` with code ``128 + signum`` (143): uncaught, the process exits quietly with
    that status, as the shell reports a process ended by SIGTERM.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class _SigtermRaises:
    """Context manager: SIGTERM raises :class:`Terminated` in the main thread while inside.

    Only when called from the main thread and SIGTERM still has its default action (a handler
    the caller installed is left alone); the previous handler is restored on exit.
    """

    def __init__(self) -> None:
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> _SigtermRaises:
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._previous = signal.signal(signal.SIGTERM, self._raise)
            self._installed = True
        return self

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False


#: ``{"function": "package.module:function", "args": {...}}``: a run's measurement, stored in its record.
MeasureCall = dict[str, Any]
Job = tuple[TrialConfig, str, str | None, MeasureCall | None]


def _run_local(jobs: Sequence[Job], workers: int) -> Generator[tuple[TrialConfig, dict[str, Any]], None, None]:
    if workers == 0:
        for cfg, kind, log_dir, measure in jobs:
            yield cfg, _execute(cfg.to_dict(), kind, log_dir, measure)
        return
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(),))
    try:
        futures = {pool.submit(_execute, cfg.to_dict(), kind, log_dir, measure): cfg for cfg, kind, log_dir, measure in jobs}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                cfg = futures[fut]
                try:
                    outcome = fut.result()
                except Exception as e:  # the worker process died (e.g. killed for memory)
                    outcome = {"run_id": config_id(cfg), "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                yield cfg, outcome
    except BaseException:
        # Interrupted (SIGTERM, Ctrl-C, an error in the parent) or the consumer stopped early:
        # a running trial would otherwise finish in its worker after the parent has gone.
        _terminate_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _terminate_workers(pool: Any, timeout: float = 5.0) -> None:
    """Terminate (then kill) a ``ProcessPoolExecutor``'s worker processes and wait for them."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join(timeout)


def _run_ray(jobs: Sequence[Job], workers: int) -> Generator[tuple[TrialConfig, dict[str, Any]], None, None]:
    try:
        import ray
    except ImportError as e:
        raise ImportError("backend='ray' needs the optional ray package: pip install 'canonreg[ray]'") from e
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False)
        started = True
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(_execute)
        refs = {remote.remote(cfg.to_dict(), kind, log_dir, measure): cfg for cfg, kind, log_dir, measure in jobs}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                cfg = refs[ref]
                try:
                    outcome = ray.get(ref)
                except Exception as e:  # the task or its worker failed outside _execute
                    outcome = {"run_id": config_id(cfg), "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                yield cfg, outcome
    finally:
        if started:
            ray.shutdown()


@dataclass(frozen=True)
class AblationResult:
    """What :func:`run_ablation` did and produced.

    Attributes:
        spec: the spec that ran (after ``--quick``).
        out: the output folder.
        configs: every run of the grid (resolved, in grid order).
        records: ``{run_id: record}`` of the finished runs of this grid (from ``results.jsonl``).
        summary: :func:`summarize` rows.
        markdown: the Markdown summary table (also in ``summary.md``).
        plots: paths of the written figures.
        new_runs: runs executed by this call. skipped_runs: runs found finished and skipped.
        stale_runs: ids of skipped runs produced by different canonreg code (:func:`code_fingerprint`).
        failures: ``{run_id: error}`` of runs that failed in this call.
    """

    spec: AblationSpec
    out: Path
    configs: tuple[TrialConfig, ...]
    records: dict[str, dict[str, Any]]
    summary: list[dict[str, Any]]
    markdown: str
    plots: tuple[Path, ...]
    new_runs: int
    skipped_runs: int
    failures: dict[str, str]
    stale_runs: tuple[str, ...] = ()


def run_ablation(
    config: str | Path | Mapping[str, Any] | AblationSpec,
    *,
    out: str | Path | None = None,
    workers: int | None = None,
    backend: Backend | None = None,
    resume: bool = True,
    quick: bool = False,
    progress: bool = True,
    plots: bool = True,
    measure: str | None = None,
    measure_args: Mapping[str, Any] | None = None,
) -> AblationResult:
    """Run (or finish) an ablation grid and write its results, tables and figures.

    Everything is validated first; nothing runs and nothing is written for a bad config.

    Args:
        config: TOML path, TOML-shaped mapping or :class:`AblationSpec`.
        out: output folder (default: the spec's ``out``, else ``runs/<name>``; ``-quick`` is appended
            in quick mode when the folder comes from the spec).
        workers: worker processes (default: the spec's, else ``os.cpu_count()``, capped by the number
            of runs left); ``0`` runs in this process.
        backend: ``"local"`` or ``"ray"`` (default: the spec's).
        resume: skip runs already in ``results.jsonl``; ``False`` moves an existing file to
            ``results.jsonl.prev`` (``.prev.2``, ``.prev.3``, … when taken: nothing is overwritten) and runs
            everything again.
        quick: apply the spec's ``[quick]`` overrides.
        progress: show a tqdm bar over the runs (needs tqdm).
        plots: write the figures (needs matplotlib).
        measure: ``"package.module:function"``, a measurement of every trained model run in the
            worker, ``function(trained, split, **measure_args) -> dict``
            (:mod:`canonreg.ablate.measure`); its dict is stored in the run's record under
            ``"measure"``, the call under ``"measure_call"``. The module must be importable in the
            workers: worker processes get this process's ``sys.path`` (a script's folder included),
            Ray tasks need it installed. A failing measurement fails its run (``errors.jsonl``,
            retried on the next start). With ``resume``, a finished run counts only if its record
            holds this same call (function and args); others are run again.
        measure_args: JSON mapping of keyword arguments for ``measure`` (tuples arrive as lists).

    Raises:
        ValueError / TypeError: a bad config or argument (before anything runs).
        ImportError: ``backend="ray"`` without ray, ``progress=True`` without tqdm.
    """
    spec, configs, out_dir, backend, nworkers = _prepare(config, out=out, workers=workers, backend=backend, quick=quick, progress=progress)
    call = _measure_call(measure, measure_args)
    return _run_prepared(spec, configs, out_dir, backend, nworkers, resume=resume, progress=progress, plots=plots, measure=call)


def _measure_call(measure: str | None, measure_args: Mapping[str, Any] | None) -> MeasureCall | None:
    """The checked ``{"function", "args"}`` of :func:`run_ablation`'s ``measure`` (None without one)."""
    if measure is None:
        if measure_args is not None:
            raise ValueError(f"Expected `measure_args` only together with `measure`, but got measure_args={measure_args!r} without it")
        return None
    resolve_measure(measure)  # importable here, before anything runs
    return {"function": measure, "args": measure_args_json(measure_args)}


def _prepare(
    config: str | Path | Mapping[str, Any] | AblationSpec,
    *,
    out: str | Path | None,
    workers: int | None,
    backend: Backend | None,
    quick: bool,
    progress: bool,
) -> tuple[AblationSpec, list[TrialConfig], Path, Backend, int | None]:
    """Every check of :func:`run_ablation` that comes before anything runs or is written."""
    spec = load_spec(config)
    if quick:
        if not spec.quick:
            raise ValueError(f"Expected a [quick] table in the config of ablation {spec.name!r} for quick mode (--quick), but it has none")
        spec = spec.with_quick()
    backend = spec.backend if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"Expected `backend` to be one of {list(BACKENDS)}, but got {backend!r}")
    nworkers = spec.workers if workers is None else workers
    if nworkers is not None and (not isinstance(nworkers, int) or isinstance(nworkers, bool) or nworkers < 0):
        raise ValueError(f"Expected `workers` to be a non-negative int (0 = in this process), but got {nworkers!r}")
    if backend == "ray" and nworkers == 0:
        raise ValueError("Expected `workers` >= 1 with backend='ray', but got 0")
    if backend == "ray":
        try:
            import ray  # noqa: F401
        except ImportError as e:
            raise ImportError("backend='ray' needs the optional ray package: pip install 'canonreg[ray]'") from e
    if progress:
        progress_bar(0, disable=True).close()  # without tqdm: fail before anything is written
    if out is None:
        base = spec.out if spec.out is not None else str(Path("runs") / spec.name)
        out = base + "-quick" if quick else base
    out_dir = Path(out)
    probe = out_dir
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"Expected the output folder `out` to be a folder (created if missing), but {str(probe)!r} is a file")
    configs = spec.configs()
    _check_batch_sizes(configs)
    return spec, configs, out_dir, backend, nworkers


def _check_batch_sizes(configs: Sequence[TrialConfig]) -> None:
    """``batch_size`` ≤ the training rows of each run's built-in data set (generated once here, cached for the runs)."""
    from ..experiment import load_data

    rows: dict[tuple[Any, ...], int] = {}
    for cfg in configs:
        key = (cfg.dataset, cfg.num_samples, cfg.data_seed)
        if key not in rows:
            rows[key] = int(load_data(cfg).x.shape[0])
        if cfg.batch_size > rows[key]:
            raise ValueError(
                f"Expected `batch_size` <= the {rows[key]} training samples of {cfg.dataset!r}"
                f"{f' (num_samples={cfg.num_samples})' if cfg.dataset == 'mnist1d' else ''}, but got {cfg.batch_size}"
            )


def _run_prepared(
    spec: AblationSpec,
    configs: list[TrialConfig],
    out_dir: Path,
    backend: Backend,
    nworkers: int | None,
    *,
    resume: bool,
    progress: bool,
    plots: bool,
    measure: MeasureCall | None = None,
) -> AblationResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "spec.json").write_text(json.dumps({"spec": spec.to_dict(), "runs": len(configs)}, indent=2))
    results_path = out_dir / "results.jsonl"
    if not resume and results_path.exists():
        os.replace(results_path, _unused(out_dir / "results.jsonl.prev"))  # never over an earlier one
    ids = [config_id(c) for c in configs]
    finished = load_results(results_path, repair=True)
    if measure is not None:  # a run counts as finished only with this measurement
        finished = {rid: rec for rid, rec in finished.items() if rec.get("measure_call") == measure}
    todo = [c for c, rid in zip(configs, ids) if rid not in finished]
    skipped = len(configs) - len(todo)
    code = _code_fingerprint()
    stale = tuple(rid for rid in ids if rid in finished and finished[rid].get("env", {}).get("code") != code)
    if stale:
        warnings.warn(
            f"{len(stale)} of the {skipped} finished runs in {str(results_path)!r} were produced by different canonreg "
            "code; their numbers may differ from what this code computes (rerun them with resume=False / --no-resume)",
            RuntimeWarning,
            stacklevel=2,
        )
    failures: dict[str, str] = {}
    new_runs = 0
    if todo:
        n = min(os.cpu_count() or 1, len(todo)) if nworkers is None else min(nworkers, len(todo))
        bar = progress_bar(len(configs), progress, initial=skipped, desc=spec.name, unit="run", dynamic_ncols=True)
        env = {**environment(), "code": code}
        new_runs = _run_jobs(spec, todo, out_dir, backend, n, env, finished, failures, bar, measure)
    if new_runs:
        load_results(results_path, repair=True)  # recomputed runs: their older records to results.superseded.jsonl
    records = {rid: finished[rid] for rid in ids if rid in finished}
    summary, markdown, written = write_summaries(spec, configs, list(records.values()), out_dir, plots=plots)
    return AblationResult(
        spec, out_dir, tuple(configs), records, summary, markdown, tuple(written), new_runs, skipped, failures, stale
    )


def _unused(path: Path) -> Path:
    """``path``, or ``path.2``, ``path.3``, … : the first name not taken."""
    k, out = 1, path
    while out.exists():
        k += 1
        out = path.with_name(f"{path.name}.{k}")
    return out


def _code_fingerprint() -> str:
    from . import code_fingerprint  # looked up on the package at call time, where tests can pin it

    return code_fingerprint()


def _run_jobs(
    spec: AblationSpec,
    todo: Sequence[TrialConfig],
    out_dir: Path,
    backend: Backend,
    workers: int,
    env: Mapping[str, Any],
    finished: dict[str, dict[str, Any]],
    failures: dict[str, str],
    bar: Any,
    measure: MeasureCall | None = None,
) -> int:
    """Run ``todo``, appending each outcome as it arrives (results to ``finished``, errors to ``failures``); the new runs."""
    _prefetch_data(todo)
    log_root = out_dir / "logs"
    jobs: list[Job] = [(c, spec.logs, None if spec.logs == "none" else str(log_root / config_id(c)), measure) for c in todo]
    runs = _run_ray(jobs, workers) if backend == "ray" else _run_local(jobs, workers)
    new_runs = 0
    try:
        with _SigtermRaises():
            for cfg, outcome in runs:
                if "error" in outcome:
                    failures[outcome["run_id"]] = outcome["error"]
                    _record_failure(out_dir / "errors.jsonl", cfg, outcome, bar)
                else:
                    finished[outcome["run_id"]] = _record_result(out_dir / "results.jsonl", cfg, outcome, env, bar, measure)
                    new_runs += 1
                bar.update(1)
    finally:
        runs.close()  # stops the workers now if the loop was left by an exception
        bar.close()
    return new_runs


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _record_failure(path: Path, cfg: TrialConfig, outcome: Mapping[str, Any], bar: Any) -> None:
    rid = outcome["run_id"]
    _append_line(path, {"run_id": rid, "config": cfg.to_dict(), "error": outcome["error"], "traceback": outcome["traceback"], "at": _now()})
    bar.set_postfix_str(f"FAILED {rid}: {outcome['error'][:60]}")


def _record_result(
    path: Path, cfg: TrialConfig, outcome: Mapping[str, Any], env: Mapping[str, Any], bar: Any, measure: MeasureCall | None = None
) -> dict[str, Any]:
    result = {k: v for k, v in outcome["result"].items() if k not in ("config", "run_id", "measure")}
    record = {"run_id": outcome["run_id"], "config": cfg.to_dict(), "result": result, "env": dict(env), "finished_at": _now()}
    if measure is not None:
        record.update(measure=outcome["result"]["measure"], measure_call=measure)
    _append_line(path, record)
    m = scalar_metrics(result)
    bar.set_postfix_str(f"{cfg.arm} test_acc={m['test_acc']:.3f} α={m['mean_alpha']:.3f}")
    return record


def _prefetch_data(configs: Sequence[TrialConfig]) -> None:
    """Generate each distinct dataset once in this process, so that workers read the disk cache."""
    from ..experiment import load_data

    seen = set()
    for c in configs:
        key = (c.dataset, c.num_samples if c.dataset == "mnist1d" else 0, c.data_seed)
        if key not in seen:
            seen.add(key)
            load_data(c)

