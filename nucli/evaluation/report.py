"""The result of an evaluation: per-image rows, aggregates, JSON and CSV."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any

from nucli.metrics import METRICS, ImageCounts, mean_metrics, pooled_metrics

MEAN_KEY = "mean_over_images"
POOLED_KEY = "pooled_over_nuclei"


@dataclass
class ImageRow:
    """One scored image."""

    name: str
    counts: ImageCounts
    modality: str | None = None
    seconds: float | None = None  # method run time (dataset mode)
    megapixels: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"image": self.name}
        if self.modality is not None:
            out["modality"] = self.modality
        out.update(self.counts.metrics())
        out["n_true"] = self.counts.n_true
        out["n_pred"] = self.counts.n_pred
        if self.seconds is not None and self.megapixels:
            out["seconds"] = self.seconds
            out["megapixels"] = self.megapixels
            out["seconds_per_megapixel"] = self.seconds / self.megapixels
        out["counts"] = self.counts.to_dict()
        return out


def aggregate(rows: list[ImageRow]) -> dict[str, Any]:
    counts = [r.counts for r in rows]
    return {
        "n_images": len(rows),
        "n_true": int(sum(c.n_true for c in counts)),
        "n_pred": int(sum(c.n_pred for c in counts)),
        MEAN_KEY: mean_metrics(counts),
        POOLED_KEY: pooled_metrics(counts),
    }


@dataclass
class EvalReport:
    """Everything an evaluation produced; serialisable to JSON and CSV."""

    rows: list[ImageRow]
    info: dict[str, Any] = field(default_factory=dict)  # inputs, method, settings
    skipped: list[str] = field(default_factory=list)  # images without a counterpart (--allow-missing)

    @property
    def aggregate(self) -> dict[str, Any]:
        return aggregate(self.rows)

    def by_modality(self) -> dict[str, dict[str, Any]]:
        groups: dict[str, list[ImageRow]] = {}
        for r in self.rows:
            if r.modality is not None:
                groups.setdefault(r.modality, []).append(r)
        return {m: aggregate(rs) for m, rs in sorted(groups.items())}

    def timing(self) -> dict[str, float] | None:
        timed = [r for r in self.rows if r.seconds is not None and r.megapixels]
        if not timed:
            return None
        seconds = sum(r.seconds for r in timed)  # type: ignore[misc]
        mp = sum(r.megapixels for r in timed)  # type: ignore[misc]
        return {"seconds": seconds, "megapixels": mp, "seconds_per_megapixel": seconds / mp}

    def to_dict(self) -> dict[str, Any]:
        from nucli import __version__

        out: dict[str, Any] = {"nucli_version": __version__, **self.info}
        out["aggregate"] = self.aggregate
        by_mod = self.by_modality()
        if by_mod:
            out["by_modality"] = by_mod
        timing = self.timing()
        if timing:
            out["timing"] = timing
        out["metric_notes"] = (
            f"{MEAN_KEY}: per-image metrics averaged over images (published-table convention); "
            f"{POOLED_KEY}: counts summed over all images first. Matches for PQ/F1: IoU > 0.5. "
            "Both images empty -> 1, one empty -> 0."
        )
        out["images"] = [r.to_dict() for r in self.rows]
        if self.skipped:
            out["skipped"] = list(self.skipped)
        return out

    def to_csv(self) -> str:
        """One row per image (metrics, counts, timing where measured)."""
        has_mod = any(r.modality is not None for r in self.rows)
        has_time = any(r.seconds is not None for r in self.rows)
        header = ["image"] + (["modality"] if has_mod else []) + list(METRICS) + ["n_true", "n_pred"]
        if has_time:
            header += ["seconds", "megapixels", "seconds_per_megapixel"]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        for r in self.rows:
            d = r.to_dict()
            writer.writerow([_fmt(d.get(k, "")) for k in header])
        return buf.getvalue()


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6f}"
    return value


def set_name(path: Any) -> str:
    """A data set's display name: ``monuseg/val`` for ``.../monuseg/val``."""
    from pathlib import Path

    p = Path(str(path))
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


@dataclass
class MultiSetReport:
    """Several data sets scored with one method: one row per set and the mean over sets."""

    reports: list[EvalReport]

    SET_METRICS = ("aji", "aji_plus", "dice", "pq", "f1")

    def rows(self) -> list[tuple[str, dict[str, Any]]]:
        return [(set_name(r.info.get("dataset", "?")), r.aggregate) for r in self.reports]

    def mean_over_sets(self) -> dict[str, float]:
        """Each set counted once: the mean of the sets' mean-over-images metrics."""
        aggs = [r.aggregate[MEAN_KEY] for r in self.reports]
        return {k: float(sum(a[k] for a in aggs) / len(aggs)) for k in METRICS} if aggs else {}

    def to_dict(self) -> dict[str, Any]:
        from nucli import __version__

        first = self.reports[0].info if self.reports else {}
        return {
            "nucli_version": __version__,
            "mode": "datasets",
            "method": first.get("method"),
            "weights": first.get("weights"),
            "sets": [{"set": name, "n_images": agg["n_images"], MEAN_KEY: agg[MEAN_KEY]} for name, agg in self.rows()],
            "mean_over_sets": self.mean_over_sets(),
            "reports": [r.to_dict() for r in self.reports],
        }

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["set", "n_images"] + list(METRICS))
        for name, agg in self.rows():
            writer.writerow([name, agg["n_images"]] + [_fmt(agg[MEAN_KEY][k]) for k in METRICS])
        mean = self.mean_over_sets()
        writer.writerow(["mean over sets", sum(a["n_images"] for _, a in self.rows())]
                        + [_fmt(mean[k]) for k in METRICS])
        return buf.getvalue()
