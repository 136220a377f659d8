"""Markdown table (one row per set + the mean over sets) from `nucli evaluate --dataset ... -o R.json` reports.

    python benchmarks/set_table.py gensegnet=new.json watershed=ws.json

Each argument is LABEL=REPORT; rows are sets, a column group per label (AJI / PQ / F1).
The model cards' per-set tables are printed with it.
"""

from __future__ import annotations

import json
import sys


def main(args: list[str]) -> None:
    reports = []
    for a in args:
        label, _, path = a.partition("=")
        with open(path, encoding="utf-8") as fh:
            reports.append((label, json.load(fh)))
    sets = [s["set"] for s in reports[0][1]["sets"]]
    head = ["set", "images"] + [f"{label} AJI / PQ / F1" for label, _ in reports]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name in sets:
        cells = [name]
        n = None
        for _, rep in reports:
            row = next((s for s in rep["sets"] if s["set"] == name), None)
            if row is None:
                cells.append("-")
                continue
            n = row["n_images"]
            m = row["mean_over_images"]
            cells.append(f"{m['aji']:.3f} / {m['pq']:.3f} / {m['f1']:.3f}")
        cells.insert(1, str(n))
        print("| " + " | ".join(cells) + " |")
    val_sets = [n for n in sets if n.endswith("/val")]
    if val_sets and len(val_sets) < len(sets):  # the model-selection criterion: each val set counted once
        cells = [f"**mean over the {len(val_sets)} val sets**", ""]
        for _, rep in reports:
            rows = [s for s in rep["sets"] if s["set"] in val_sets]
            m = {k: sum(r["mean_over_images"][k] for r in rows) / len(rows) for k in ("aji", "pq", "f1")}
            cells.append(f"**{m['aji']:.3f}** / {m['pq']:.3f} / {m['f1']:.3f}")
        print("| " + " | ".join(cells) + " |")
    cells = [f"mean over all {len(sets)} sets", ""]
    for _, rep in reports:
        m = rep["mean_over_sets"]
        cells.append(f"{m['aji']:.3f} / {m['pq']:.3f} / {m['f1']:.3f}")
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
