"""End-to-end throughput of `starcast run` (local pipeline and Ray) next to each stage run alone, with
the shipped model on TLUSTY spectra, and the Ray path's scaling over simulated nodes.

Observes a catalog of stars from the grid of model spectra (`starcast synth --grid`, the shared
TLUSTY grid by default), then measures, in this order and on the same files:
  1. each stage alone, each in its own loop over the catalog: read (iter_batches), preprocess
     (Model.prepare), infer (Model.infer), write (ParquetWriter); spectra/s = N / its time;
  2. the local pipeline end to end (`python -m starcast run`, a subprocess), with its peak RSS;
  3. the Ray pipeline end to end (`--ray local`: a fresh local Ray instance; startup included);
  4. with --scaling, the Ray pipeline on a `ray.cluster_utils.Cluster` of 1, 2 and 4 one-CPU nodes
     (a head without CPUs), on the first `--scaling-rows` spectra. The nodes share this machine's
     cores: efficiency per core = rate / (min(nodes, cores) x the one-node rate).
Goals (issue 13): local in run >= 0.8x the stages in series; Ray in run >= 0.8x local in run.
Writes bench/results/pipeline_bench.json and .md.  Usage: python bench/pipeline_bench.py [--n 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from starcast.catalogs.io import iter_batches, list_inputs, read_grid
from starcast.engine.predictor import load_model

import starcast

RESULTS = Path(__file__).parent / "results"
GRID = Path(__file__).resolve().parents[2] / "shared" / "data" / "tlusty-bstar2006" / "grid.npz"


def stages_alone(catalog: Path, model: str, batch_size: int, scratch: Path) -> dict:
    """Each stage in its own loop over the whole catalog (no overlap, and no other stage's threads
    spinning between calls): read; preprocess (reading untimed); infer on the kept prepared batches
    (D float32 per spectrum held in memory); write the kept results."""
    model, files = load_model(model), list_inputs(catalog)
    seconds = {}

    t0 = time.perf_counter()
    rows = sum(b.num_rows for f in files for b in iter_batches(f, batch_rows=batch_size))
    seconds["read"] = time.perf_counter() - t0

    prepared, seconds["preprocess"] = [], 0.0
    for f in files:
        grid = read_grid(f)
        for batch in iter_batches(f, batch_rows=batch_size):
            t0 = time.perf_counter()
            prepared.append(model.prepare(batch, source_grid=grid))
            seconds["preprocess"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    results = [model.infer(p) for p in prepared]
    seconds["infer"] = time.perf_counter() - t0
    del prepared

    t0 = time.perf_counter()
    with pq.ParquetWriter(scratch / "stage-write.parquet", results[0].schema) as writer:
        for table in results:
            writer.write_table(table)
    seconds["write"] = time.perf_counter() - t0
    return {"rows": rows, "seconds": seconds, "spectra_per_s": {k: rows / v for k, v in seconds.items()}}


def end_to_end(catalog: Path, model: str, out: Path, batch_size: int, ray: str | None) -> dict:
    """`python -m starcast run` in a subprocess: wall time, peak RSS (of that process), manifest."""
    cmd = [sys.executable, "-m", "starcast", "run", str(catalog), "--out", str(out), "--model",
           model, "--batch-size", str(batch_size), "--no-progress"]
    cmd += ["--ray", ray] if ray else []
    shutil.rmtree(out, ignore_errors=True)  # a run refuses a non-empty --out (e.g. an earlier trial's)
    t0 = time.perf_counter()
    # A small launcher process runs the command: a child's ru_maxrss includes what it inherited at
    # fork, so forking from this (large) process directly would report this process's RSS.
    launcher = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", launcher, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 3):  # 3: finished, some rows failed (counted in the manifest)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    peak_kib = int(proc.stdout.split()[-1])
    manifest = json.loads((out / "run-manifest.json").read_text())
    rows = manifest["totals"]["rows_out"]
    return {"rows": rows, "rows_failed": manifest["totals"]["rows_failed"], "wall_s": wall,
            "model_sha256": manifest["model_sha256"],
            "spectra_per_s_wall": rows / wall,
            "spectra_per_s_manifest": manifest["throughput_spectra_per_s"],
            "peak_rss_mib": peak_kib / 1024, "stage_seconds": manifest["stage_seconds"]}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    import numba
    import pyarrow
    import ray
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_at_start": os.getloadavg(),
            "python": platform.python_version(), "starcast": starcast.__version__, "numpy": np.__version__,
            "pyarrow": pyarrow.__version__, "torch": torch.__version__, "numba": numba.__version__,
            "ray": ray.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def scaling(catalog: Path, model: str, work: Path, batch_size: int, rows: int,
            nodes: tuple[int, ...]) -> list:
    """The Ray path on simulated clusters of `nodes` one-CPU nodes (see the module docstring)."""
    from ray.cluster_utils import Cluster

    subset = work / f"scaling-{rows}"
    if not subset.is_dir():
        subset.mkdir()
        for f in list_inputs(catalog):
            if sum(pq.ParquetFile(g).metadata.num_rows for g in subset.iterdir()) >= rows:
                break
            (subset / f.name).symlink_to(f)
    out = []
    for k in nodes:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for _ in range(k):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        try:
            run = end_to_end(subset, model, work / f"out-scaling-{k}", batch_size, cluster.address)
        finally:
            cluster.shutdown()
        out.append({"nodes": k, **run})
    one = out[0]["spectra_per_s_manifest"]
    for entry in out:
        cores = min(entry["nodes"], os.cpu_count())
        entry["efficiency_per_core"] = entry["spectra_per_s_manifest"] / (cores * one)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="spectra in the catalog")
    ap.add_argument("--model", default="ob-default")
    ap.add_argument("--grid", type=Path, default=GRID, help="grid of model spectra to observe")
    ap.add_argument("--shard-rows", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--scaling", action="store_true", help="also Ray on 1, 2 and 4 simulated nodes")
    ap.add_argument("--scaling-rows", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=1, help="trials of the stages and local runs (best kept)")
    ap.add_argument("--workdir", type=Path, help="keep catalogs here (reused when present)")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="starcast-bench-"))
    catalog = work / f"tlusty-{args.n}"
    if not catalog.is_dir():
        subprocess.run([sys.executable, "-m", "starcast", "synth", "--n", str(args.n), "--grid",
                        str(args.grid), "--out", str(catalog), "--shard-rows", str(args.shard_rows),
                        "--seed", "7"], check=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "workdir"}
    report = {"machine": machine(), "config": config}
    trials = {"stages_alone": [], "local": []}
    for i in range(args.repeat):  # interleaved, best of `repeat`: the machine is shared and noisy
        trials["stages_alone"].append(stages_alone(catalog, args.model, args.batch_size, work))
        trials["local"].append(end_to_end(catalog, args.model, work / f"out-local-{i}", args.batch_size,
                                          None))
    report["trials"] = trials
    runs = trials["stages_alone"]
    report["stages_alone"] = {"rows": runs[0]["rows"],
                              "seconds": {k: min(r["seconds"][k] for r in runs) for k in runs[0]["seconds"]}}
    report["stages_alone"]["spectra_per_s"] = {k: report["stages_alone"]["rows"] / v
                                               for k, v in report["stages_alone"]["seconds"].items()}
    report["local"] = max(trials["local"], key=lambda e: e["spectra_per_s_manifest"])
    stages = report["stages_alone"]
    serial = stages["rows"] / sum(stages["seconds"].values())
    local = report["local"]["spectra_per_s_manifest"]
    report["bounds"] = {"serial_sum_spectra_per_s": serial, "local_in_run_over_serial_sum": local / serial}
    if not args.no_ray:
        report["ray"] = end_to_end(catalog, args.model, work / "out-ray", args.batch_size, "local")
        report["bounds"]["ray_in_run_over_local_in_run"] = report["ray"]["spectra_per_s_manifest"] / local
    if args.scaling:
        report["scaling"] = scaling(catalog, args.model, work, args.batch_size, args.scaling_rows, (1, 2, 4))

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "pipeline_bench.md").write_text(markdown(report) + "\n")
    print(markdown(report))


def markdown(r: dict) -> str:
    m, c, s, b = r["machine"], r["config"], r["stages_alone"], r["bounds"]
    lines = [f"# pipeline_bench (best of {c['repeat']}): {s['rows']:,} TLUSTY spectra "
             f"({Path(c['grid']).name}), "
             f"model {c['model']} (bundle {r['local']['model_sha256'][:12]}), batch {c['batch_size']}",
             "", f"{m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}; load average at start "
             f"{m['load_average_at_start'][0]:.1f}; starcast {m['starcast']}, torch {m['torch']}, numba "
             f"{m['numba']}, ray {m['ray']}, pyarrow {m['pyarrow']}", "",
             "| what | spectra/s (wall) | spectra/s (in run) | seconds (wall) | peak RSS MiB |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| stage alone: {k} | | {s['spectra_per_s'][k]:,.0f} | {s['seconds'][k]:.1f} | |"
              for k in s["seconds"]]
    lines.append(f"| stages in series (sum of the above) | | {b['serial_sum_spectra_per_s']:,.0f} | | |")
    runs = [("local pipeline", r["local"])]
    if "ray" in r:
        runs.append(("Ray (`--ray local`, fresh instance)", r["ray"]))
    lines += [f"| {name} | {e['spectra_per_s_wall']:,.0f} | {e['spectra_per_s_manifest']:,.0f} "
              f"| {e['wall_s']:.1f} | {e['peak_rss_mib']:.0f} |" for name, e in runs]
    lines += ["", "wall: the whole `python -m starcast run` process (imports, Numba cache, Ray start); "
              "in run: rows / the run's own wall time (run-manifest.json). Peak RSS: the run's process "
              "(Ray: the driver only).", "",
              f"- local in run / stages in series = {b['local_in_run_over_serial_sum']:.2f} (goal >= 0.8)"]
    if "ray_in_run_over_local_in_run" in b:
        lines.append(f"- Ray in run / local in run = {b['ray_in_run_over_local_in_run']:.2f} (goal >= 0.8)")
    if "scaling" in r:
        lines += ["", f"Ray on simulated one-CPU nodes (`ray.cluster_utils.Cluster`, head without CPUs), "
                  f"{r['scaling'][0]['rows']:,} spectra; the nodes share this machine's {m['cores']} "
                  "cores:", "",
                  "| nodes | spectra/s (in run) | efficiency per core |", "| ---: | ---: | ---: |"]
        lines += [f"| {e['nodes']} | {e['spectra_per_s_manifest']:,.0f} | {e['efficiency_per_core']:.2f} |"
                  for e in r["scaling"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
