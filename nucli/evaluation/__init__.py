"""Evaluation: read predictions and ground truth in any supported format and score them.

* :func:`evaluate_paths` -- a prediction file/folder against a ground-truth file/folder;
* :func:`evaluate_dataset` -- run a method over ``DIR/images`` and score ``DIR/labels``;
* :class:`EvalReport` -- per-image rows, mean and pooled aggregates, JSON/CSV.

The metrics themselves live in :mod:`nucli.metrics`.
"""

from nucli.evaluation.report import EvalReport, ImageRow
from nucli.evaluation.runner import dataset_items, evaluate_dataset, evaluate_paths, pair_inputs, read_pair

__all__ = [
    "EvalReport",
    "ImageRow",
    "dataset_items",
    "evaluate_dataset",
    "evaluate_paths",
    "pair_inputs",
    "read_pair",
]
