"""MC dropout against a plain deep ensemble, same data, same budget: which one to ship.

Trains variants of a training config (default `trainers/configs/ob-default.toml`) that differ only in
dropout p and the number of samples S (p = 0, S = 1 is the plain deep ensemble), at a reduced budget
(--epochs, --per-epoch) so both fit on a small machine, and scores each on the config's test nodes
(left out of training) through the exported bundle: RMSE, bias, and 68% / 95% coverage overall and in
three SNR bands, and the CPU inference rate. Records bench/results/dropout_vs_ensemble.{json,md}.
Usage: python bench/dropout_vs_ensemble.py [--epochs 10] [--per-epoch 20000] [--variants 0:1 0.03:16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from starcast.engine.predictor import load_model
from starcast.trainers.config import load_config
from starcast.trainers.gridsource import GridSource
from starcast.trainers.metrics import coverage
from starcast.trainers.pipeline import train_from_config

import starcast

RESULTS = Path(__file__).parent / "results"
BANDS = ((10.0, 30.0), (30.0, 100.0), (100.0, 500.0))


def score(bundle: Path, table) -> dict:
    model = load_model(bundle)
    t0 = time.perf_counter()
    out = model.predict(table, backend="cpu")
    rate = table.num_rows / (time.perf_counter() - t0)
    snr = table.column("snr").to_numpy()
    res = {"predict_spectra_per_s": rate}
    for t in ("teff", "logg", "vsini"):
        y, m, s = (np.asarray(c, float) for c in (table.column(t), out.column(t), out.column(f"{t}_err")))
        entry = {"rmse": float(np.sqrt(np.mean((m - y) ** 2))), "bias": float(np.mean(m - y)),
                 "coverage_68": coverage(y, m, s, 0.68), "coverage_95": coverage(y, m, s, 0.95)}
        for lo, hi in BANDS:
            sel = (snr >= lo) & (snr < hi)
            entry[f"snr_{lo:g}_{hi:g}"] = {"rmse": float(np.sqrt(np.mean((m[sel] - y[sel]) ** 2))),
                                           "coverage_68": coverage(y[sel], m[sel], s[sel], 0.68),
                                           "coverage_95": coverage(y[sel], m[sel], s[sel], 0.95)}
        res[t] = entry
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="trainers/configs/ob-default.toml")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--per-epoch", type=int, default=20000)
    ap.add_argument("--variants", nargs="+", default=["0:1", "0.03:16"], help="dropout:samples")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    cfg = load_config(args.config)
    cfg = replace(cfg, data=replace(cfg.data, grid={**cfg.data.grid, "per_epoch": args.per_epoch}),
                  training=replace(cfg.training, epochs=args.epochs, patience=args.epochs))
    table = GridSource(cfg, progress=False).split_table("test")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            p, s = variant.split(":")
            arch = replace(cfg.architecture, dropout=float(p), samples=int(s))
            v = replace(cfg, architecture=arch, calibration=replace(cfg.calibration, samples=int(s)))
            t0 = time.perf_counter()
            trained = train_from_config(v, output=Path(tmp) / variant.replace(":", "_"), progress=False)
            rows[f"p={p}, S={s}"] = {"train_seconds": time.perf_counter() - t0, **score(trained.path, table)}
    record = {"command": f"python bench/dropout_vs_ensemble.py --config {args.config} --epochs {args.epochs} "
                         f"--per-epoch {args.per_epoch} --variants {' '.join(args.variants)}",
              "note": args.note, "machine": platform.processor() or platform.machine(),
              "cores": os.cpu_count(),
              "load_average": os.getloadavg(), "versions": {"starcast": starcast.__version__,
                                                            "torch": torch.__version__},
              "test_rows": table.num_rows, "variants": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dropout_vs_ensemble.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"# MC dropout vs plain deep ensemble ({args.epochs} epochs x {args.per_epoch} spectra; "
             f"{table.num_rows} spectra at the test nodes)", "", f"`{record['command']}`; {args.note}", "",
             "| variant | target | RMSE | 68% / 95% cover | SNR 10-30 | SNR 30-100 | SNR 100-500 | "
             "predict /s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        for t in ("teff", "logg", "vsini"):
            e = r[t]
            cells = [e[f"snr_{lo:g}_{hi:g}"] for lo, hi in BANDS]
            bands = " | ".join(f"{c['rmse']:.3g}, {100 * c['coverage_68']:.0f}%" for c in cells)
            lines.append(f"| {name} | {t} | {e['rmse']:.4g} | {100 * e['coverage_68']:.1f}% / "
                         f"{100 * e['coverage_95']:.1f}% | {bands} | {r['predict_spectra_per_s']:.0f} |")
    lines += ["", "SNR columns: RMSE and 68% coverage in the band."]
    (RESULTS / "dropout_vs_ensemble.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
