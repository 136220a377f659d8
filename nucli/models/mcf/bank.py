"""The template bank: templates + their filters + the detector built on them (saved as tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nucli.errors import WeightsError
from nucli.models.mcf.detector import Detector, DetectorParams, calibrate_floor
from nucli.models.mcf.filters import build_filters
from nucli.models.mcf.templates import Template

NORM_FLOOR_FRACTION = 0.5


@dataclass
class Bank:
    templates: list[Template]
    filters: list[list[np.ndarray]]
    params: DetectorParams
    detector: Detector = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.detector = Detector(self.filters, self.params)

    @classmethod
    def build(cls, templates: list[Template], params: DetectorParams | None = None) -> "Bank":
        """Train the filters of ``templates`` and calibrate the response floor on them."""
        params = DetectorParams.from_dict((params or DetectorParams()).to_dict())
        filters = build_filters(templates, k=params.k, scale_span=params.scale_span, cell=params.cell,
                                sigma_frac=params.sigma_frac, lam=params.lam, feat_kw=params.feat_kw)
        bank = cls(list(templates), filters, params)
        params.norm_floor = calibrate_floor(bank.detector, templates, NORM_FLOOR_FRACTION)
        return bank

    def extended(self, new: list[Template]) -> "Bank":
        """A new bank with ``new`` templates added (filters of the old ones kept, floor recalibrated)."""
        p = self.params
        filters = self.filters + build_filters(new, k=p.k, scale_span=p.scale_span, cell=p.cell,
                                               sigma_frac=p.sigma_frac, lam=p.lam, feat_kw=p.feat_kw)
        params = DetectorParams.from_dict(p.to_dict())
        bank = Bank(self.templates + list(new), filters, params)
        params.norm_floor = calibrate_floor(bank.detector, bank.templates, NORM_FLOOR_FRACTION)
        return bank

    @property
    def diameters(self) -> list[float]:
        return [float(t.diameter) for t in self.templates]

    # ------------------------------------------------------------ tensors
    def to_tensors(self) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {}
        for i, t in enumerate(self.templates):
            out[f"template.{i}"] = torch.from_numpy(np.ascontiguousarray(t.window, np.float32))
            for k, f in enumerate(self.filters[i]):
                out[f"filter.{i}.{k}"] = torch.from_numpy(np.ascontiguousarray(f, np.float32))
        return out

    def describe(self) -> dict[str, Any]:
        return {"detector": self.params.to_dict(), "diameters": self.diameters,
                "sources": [t.source for t in self.templates]}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Any], info: dict[str, Any], where: str = "weights") -> "Bank":
        params = DetectorParams.from_dict(info.get("detector"))
        diameters = info.get("diameters")
        if not isinstance(diameters, list) or not diameters:
            raise WeightsError(f"{where}: the MCF template bank is missing (no 'diameters' in its config)")
        sources = list(info.get("sources") or [""] * len(diameters))
        templates, filters = [], []
        for i, d in enumerate(diameters):
            key = f"template.{i}"
            if key not in tensors:
                raise WeightsError(f"{where}: template {i} of {len(diameters)} is missing")
            templates.append(Template(tensors[key].float().numpy(), float(d), sources[i] if i < len(sources) else ""))
            row = []
            for k in range(params.k):
                fk = f"filter.{i}.{k}"
                if fk not in tensors:
                    raise WeightsError(f"{where}: filter {i}.{k} is missing (was it saved with another K?)")
                row.append(tensors[fk].float().numpy())
            filters.append(row)
        channels = {f.shape[0] for row in filters for f in row}
        from nucli.models.mcf.features import n_channels

        if channels != {n_channels(params.n_orient, params.n_levels)}:
            raise WeightsError(f"{where}: MCF filters have {sorted(channels)} feature channels, "
                               f"the stored feature settings give {n_channels(params.n_orient, params.n_levels)}")
        return cls(templates, filters, params)
