"""Shipped models side by side: the CPU rate of each stage of `Model.predict` on the same spectra.

Issue 9 asks that the default model trained on TLUSTY physics does not predict more than 20% slower
on the CPU than the one it replaced. This bench loads two bundles (default: the previous default,
taken from git at --baseline-rev, and the current one), draws one catalog of TLUSTY-sample stars
(`starcast/data/tlusty-sample.npz`, 4000-4800 A at 0.2 A), and times, interleaved and best of
--repeat: `prepare` (preprocessing onto the model grid) and `infer` (the CPU kernel, the model's
default S) per model, with torch and Numba on all cores. Records machine, versions, each model's
architecture and training time (from its manifest) in bench/results/model_bench.{json,md}.
Usage: python bench/model_bench.py [--n 4000] [--baseline-rev 71b298a]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from starcast.catalogs.grids import read_grid
from starcast.catalogs.gridsynth import synth_from_grid
from starcast.engine.bundle import seal
from starcast.engine.predictor import load_model

import starcast
from starcast.demo import SAMPLE

RESULTS = Path(__file__).parent / "results"
BUNDLE = "starcast/models/ob-default"


def bundle_at(rev: str, dest: Path) -> Path:
    """The default bundle as it was at git revision `rev`, written to `dest` and sealed (bundles before
    the manifest hash carried only the weights' sha256)."""
    root = Path(__file__).resolve().parent.parent
    dest.mkdir(parents=True)
    for name in ("manifest.json", "model.safetensors"):
        blob = subprocess.run(["git", "-C", str(root), "show", f"{rev}:{BUNDLE}/{name}"], check=True,
                              capture_output=True).stdout
        (dest / name).write_bytes(blob)
    seal(dest)
    return dest


def seconds(fn) -> float:
    """Wall-clock seconds of one call of `fn`."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000, help="spectra")
    ap.add_argument("--baseline-rev", default="71b298a", help="git revision of the previous default")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth_from_grid(read_grid(SAMPLE), args.n, tmp / "catalog", at_nodes=True, seed=7,
                        snr=(20.0, 300.0))
        table = pq.read_table(tmp / "catalog")
        previous = load_model(bundle_at(args.baseline_rev, tmp / "old"))
        models = {f"previous ({args.baseline_rev})": previous, "current": load_model(BUNDLE)}
        prepared = {name: m.prepare(table) for name, m in models.items()}  # warm-up (Numba, weights)
        for name, m in models.items():
            m.infer(prepared[name].slice(0, 64), backend="cpu")
        # each repeat times every model's stages in turn, so that a change in the machine's load
        # between repeats reaches both models alike; the best of the repeats per model and stage
        best = {name: {"prepare": math.inf, "infer": math.inf} for name in models}
        for _ in range(args.repeat):
            for name, m in models.items():
                best[name]["prepare"] = min(best[name]["prepare"], seconds(lambda m=m: m.prepare(table)))
                best[name]["infer"] = min(best[name]["infer"], seconds(
                    lambda m=m, name=name: m.infer(prepared[name], backend="cpu")))
        rows = {}
        for name, m in models.items():
            arch = m.bundle.architecture
            prep, infer = best[name]["prepare"], best[name]["infer"]
            rows[name] = {"bundle": m.bundle.sha256[:12], "members": arch["members"],
                          "samples": arch["samples"], "hidden": arch["hidden"],
                          "input_dim": arch["input_dim"], "dropout": arch["dropout"],
                          "train_seconds": m.bundle.manifest["provenance"].get("train_seconds"),
                          "prepare_spectra_per_s": args.n / prep, "infer_spectra_per_s": args.n / infer,
                          "predict_spectra_per_s": args.n / (prep + infer)}
    names = list(rows)
    ratio = rows[names[1]]["predict_spectra_per_s"] / rows[names[0]]["predict_spectra_per_s"]
    record = {"command": "python bench/model_bench.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "note"),
              "note": args.note, "machine": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "load_average": os.getloadavg(),
              "torch_threads": torch.get_num_threads(),
              "versions": {"starcast": starcast.__version__, "torch": torch.__version__,
                           "numpy": np.__version__},
              "n": args.n, "models": rows, "current_over_previous_predict_rate": ratio}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "model_bench.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"# Shipped models side by side ({args.n} TLUSTY-sample spectra, CPU, best of "
             f"{args.repeat})", "",
             f"`{record['command']}`; {record['cores']} cores, load average {record['load_average'][0]:.1f} "
             f"at the end; {args.note}", "",
             "| model | bundle | M x S | hidden | D | trained (s) | prepare /s | infer /s | predict /s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['bundle']} | {r['members']} x {r['samples']} | {r['hidden']} | "
                     f"{r['input_dim']} | {r['train_seconds']} | {r['prepare_spectra_per_s']:.0f} | "
                     f"{r['infer_spectra_per_s']:.0f} | {r['predict_spectra_per_s']:.0f} |")
    lines += ["", f"current / previous predict rate: {ratio:.2f}x (goal: >= 0.8x)"]
    (RESULTS / "model_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
