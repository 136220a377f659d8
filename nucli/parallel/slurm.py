"""Dask workers as SLURM jobs (dask-jobqueue): the cluster configuration file and the cluster."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nucli.errors import InputError, NotAvailableError, UsageError


_NUCLI_SLURM_KEYS = ("jobs",)


def _slurm_keys() -> set[str]:
    import inspect

    from dask_jobqueue import core, slurm

    keys: set[str] = set()
    for fn in (slurm.SLURMJob.__init__, core.Job.__init__, core.JobQueueCluster.__init__):
        keys |= {p for p in inspect.signature(fn).parameters
                 if p not in ("self", "scheduler", "base_class_kwargs", "job_kwargs", "job_cls", "loop",
                              "asynchronous", "config_name", "n_workers", "host", "dashboard_address")}
    return keys


def load_cluster_config(path: "str | os.PathLike[str]") -> dict[str, Any]:
    """Read a SLURMCluster configuration (YAML or JSON) -> keyword arguments (+ nucli's ``jobs``).

    The file holds SLURMCluster's arguments at the top level (``cores``,
    ``memory``, ``walltime``, ``account``, ``queue``, ``job_extra_directives``,
    ...) or dask-jobqueue's own layout (``jobqueue: slurm: {...}``). Extra key:
    ``jobs`` (how many SLURM jobs to start; default: enough for ``--workers``,
    else 1).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--cluster-config {path}: file not found")
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"--cluster-config {path}: cannot read it ({exc.strerror})") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - yaml/json error types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"--cluster-config {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                         f"({first})") from None
    if isinstance(data, dict) and isinstance(data.get("jobqueue"), dict):
        data = data["jobqueue"].get("slurm", data["jobqueue"])
    if not isinstance(data, dict) or not data:
        raise InputError(f"--cluster-config {path}: expected a mapping of SLURMCluster settings "
                         "(see examples/dask_jobqueue.yaml)")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    try:
        known = _slurm_keys()
    except ImportError:
        raise NotAvailableError("--cluster slurm needs dask-jobqueue; install it with `pip install dask-jobqueue`") \
            from None
    unknown = sorted(k for k in data if k not in known and k not in _NUCLI_SLURM_KEYS)
    if unknown:
        raise UsageError(f"--cluster-config {path}: unknown setting(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(known | set(_NUCLI_SLURM_KEYS)))}")
    missing = [k for k in ("cores", "memory") if data.get(k) in (None, "")]
    if missing:
        raise UsageError(f"--cluster-config {path}: set {' and '.join(missing)} (per SLURM job)")
    jobs = data.get("jobs")
    if jobs is not None and (not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1):
        raise UsageError(f"--cluster-config {path}: 'jobs' must be a whole number >= 1, got {jobs!r}")
    return data


def slurm_cluster(config: dict[str, Any], workers: int | None = None) -> tuple[Any, dict[str, int]]:
    """A (not yet scaled) SLURMCluster from :func:`load_cluster_config` output, and how to scale it."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise NotAvailableError("--cluster slurm needs dask-jobqueue; install it with `pip install dask-jobqueue`") \
            from None
    kwargs = {k: v for k, v in config.items() if k not in _NUCLI_SLURM_KEYS}
    try:
        cluster = SLURMCluster(**kwargs)
    except (TypeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"--cluster-config: dask-jobqueue refused the settings ({first})") from None
    if config.get("jobs"):
        scale = {"jobs": int(config["jobs"])}
    elif workers:
        scale = {"n": int(workers)}
    else:
        scale = {"jobs": 1}
    return cluster, scale
