"""Benchmark of the catalogs sub-package: synthetic-survey generator and Parquet write/read rates.

Run: `python bench/catalog_bench.py [--n 2000]`. Side by side in one process:
- generator: the Numba kernel at 1 and 2 threads vs a plain NumPy/SciPy loop over spectra doing the
  same math (scipy Voigt profiles, np.convolve with the same kernel, np.interp of the running integral);
- Parquet: `write_catalog` (zstd, byte-stream split) vs pyarrow's default (snappy, dictionary), an
  uncompressed write and a raw `np.save` baseline;
  `read_catalog`, streaming `iter_batches`, and `np.load` of the same bytes.
Writes bench/results/catalog_bench.json and .md. Timings are wall-clock medians of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy
from scipy import special
from starcast.catalogs import physics
from starcast.catalogs.io import iter_batches, read_catalog, write_catalog
from starcast.catalogs.synth import (
    SynthConfig,
    _internal_grid,
    _sigma_instrument,
    arrays_to_table,
    compute_spectra,
    draw_labels,
    synth,
)

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores_visible": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "numpy": np.__version__, "numba": numba.__version__, "pyarrow": pa.__version__,
            "scipy": scipy.__version__, "load_average_at_start": os.getloadavg()}


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def numpy_reference(cfg: SynthConfig, labels: dict, i: int) -> np.ndarray:
    """The rest-frame normalised spectrum i, in plain NumPy/SciPy (the no-Numba baseline)."""
    lam = _internal_grid(cfg, cfg.grid().values())
    tau = np.zeros_like(lam)
    for line, w in zip(physics.LINES, physics.line_strengths(labels["teff"][i], labels["logg"][i]),
                       strict=True):
        b = math.sqrt(2 * physics.K_B * labels["teff"][i] / (line.mass * physics.AMU) * 1e-6
                      + cfg.microturbulence**2)
        sigma = line.wavelength * b / (physics.C_KMS * math.sqrt(2))
        gamma = line.gamma0 * 10 ** (0.5 * (labels["logg"][i] - 4))
        win = np.abs(lam - line.wavelength) < line.window
        edge = special.voigt_profile(line.window, sigma, gamma)
        profile = special.voigt_profile(lam[win] - line.wavelength, sigma, gamma)
        tau[win] += w * np.clip(profile - edge, 0, None)
    dv = physics.C_KMS * math.log(lam[1] / lam[0])
    kern = physics.velocity_kernel(dv, labels["vsini"][i], cfg.epsilon, _sigma_instrument(cfg))
    g = np.convolve(np.exp(-tau), kern, mode="same")
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (g[1:] + g[:-1]) * np.diff(lam))])
    wl = cfg.grid().values()
    edges = np.concatenate([[wl[0] - cfg.step / 2], wl + cfg.step / 2])
    return np.diff(np.interp(edges, lam, cum)) / cfg.step


def conv_flops(cfg: SynthConfig, vsini: np.ndarray) -> float:
    """Multiply-adds of the broadening convolution per spectrum (the dominant cost), mean over vsini."""
    lam = _internal_grid(cfg, cfg.grid().values())
    dv = physics.C_KMS * math.log(lam[1] / lam[0])
    widths = [physics.velocity_kernel(dv, v, cfg.epsilon, _sigma_instrument(cfg)).size for v in vsini[:200]]
    return 2.0 * lam.size * float(np.mean(widths))


def bench_generator(n: int, repeats: int) -> dict:
    cfg = SynthConfig(n=n, seed=1)
    labels = draw_labels(cfg)
    compute_spectra(cfg, labels, slice(0, 8))  # compile (or load the cache)
    out = {"config": {"n": n, "npix": cfg.npix, "oversample": cfg.oversample, "vsini": cfg.vsini},
           "internal_pixels": int(_internal_grid(cfg, cfg.grid().values()).size)}
    flops = conv_flops(cfg, labels["vsini"])
    for threads in (1, 2):
        numba.set_num_threads(threads)
        cpu0 = time.process_time()
        sec = timed(lambda: compute_spectra(cfg, labels, slice(0, n)), repeats)
        cpu = (time.process_time() - cpu0) / repeats
        out[f"numba_{threads}_threads"] = {"spectra_per_s": n / sec, "seconds": sec, "cpu_seconds": cpu,
                                           "spectra_per_cpu_s": n / cpu,
                                           "conv_gflop_per_s": flops * n / sec / 1e9}
    numba.set_num_threads(2)
    n_ref = max(n // 40, 10)
    t0 = time.perf_counter()
    ref = [numpy_reference(cfg, labels, i) for i in range(n_ref)]
    sec = time.perf_counter() - t0
    ours = compute_spectra(cfg, labels, slice(0, n_ref)).normalised
    out["numpy_scipy_baseline"] = {"spectra_per_s": n_ref / sec, "n": n_ref,
                                   "max_abs_diff_vs_numba": float(np.max(np.abs(np.array(ref) - ours)))}
    out["conv_flop_per_spectrum"] = flops
    with tempfile.TemporaryDirectory(dir=os.environ.get("STARCAST_BENCH_DIR")) as tmp:
        cpu0, t0 = time.process_time(), time.perf_counter()
        synth(n, tmp, seed=1, shard_rows=max(n // 4, 1))
        sec, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    out["synth_to_parquet_2_threads"] = {"spectra_per_s": n / sec, "seconds": sec, "cpu_seconds": cpu,
                                         "spectra_per_cpu_s": n / cpu}
    best = out["numba_2_threads"]["spectra_per_s"]
    out["extrapolated_minutes_per_million_2_threads"] = 1e6 / best / 60
    # On two idle cores the CPU time per spectrum is what the wall time would be, split over two.
    per_cpu = out["numba_1_threads"]["spectra_per_cpu_s"]
    out["extrapolated_minutes_per_million_2_idle_cores"] = 1e6 / (2 * per_cpu) / 60
    return out


def bench_parquet(n: int, repeats: int) -> dict:
    cfg = SynthConfig(n=n, seed=2)
    arrays = compute_spectra(cfg, draw_labels(cfg), slice(0, n))
    table = arrays_to_table(arrays, cfg)
    payload = table.nbytes
    out = {"n": n, "arrow_bytes": payload, "bytes_per_spectrum": payload / n}
    with tempfile.TemporaryDirectory(dir=os.environ.get("STARCAST_BENCH_DIR")) as tmp:
        tmp = Path(tmp)
        raw = np.stack([arrays.flux, arrays.flux_err])
        writers = {  # name -> (write, file written)
            "write_catalog_zstd_bss": (lambda: write_catalog(table, tmp / "ours.parquet"), "ours.parquet"),
            "pyarrow_default_snappy": (lambda: pq.write_table(table, tmp / "snappy.parquet",
                                                              row_group_size=1024), "snappy.parquet"),
            "pyarrow_uncompressed": (lambda: pq.write_table(table, tmp / "none.parquet", compression="none",
                                                            row_group_size=1024), "none.parquet"),
            "numpy_save_flux_and_err": (lambda: np.save(tmp / "raw.npy", raw), "raw.npy"),
        }
        for name, (fn, file) in writers.items():
            sec = timed(fn, repeats)
            out[name] = {"seconds": sec, "MB_per_s": payload / sec / 1e6, "spectra_per_s": n / sec,
                         "file_MB": (tmp / file).stat().st_size / 1e6}
        readers = {
            "read_catalog_zstd_bss": lambda: read_catalog(tmp / "ours.parquet"),
            "iter_batches_4096_zstd_bss": lambda: sum(b.num_rows for b in iter_batches(tmp / "ours.parquet")),
            "read_catalog_snappy": lambda: read_catalog(tmp / "snappy.parquet"),
            "read_catalog_uncompressed": lambda: read_catalog(tmp / "none.parquet"),
            "numpy_load_flux_and_err": lambda: np.load(tmp / "raw.npy"),
        }
        for name, fn in readers.items():
            fn()  # page cache warm: this measures decode, not disk
            sec = timed(fn, repeats)
            out[name] = {"seconds": sec, "MB_per_s": payload / sec / 1e6, "spectra_per_s": n / sec}
    return out


def _note(row: dict) -> str:
    if "max_abs_diff_vs_numba" in row:
        return (f"n={row['n']}; max abs diff vs Numba {row['max_abs_diff_vs_numba']:.1e} (its trapezoid "
                "pixel integration is coarser than the cubic one)")
    parts = [f"{row['spectra_per_cpu_s']:.0f} spectra per CPU-second"]
    if "conv_gflop_per_s" in row:
        parts.append(f"convolution FLOPs / total time = {row['conv_gflop_per_s']:.1f} GFLOP/s")
    return "; ".join(parts)


def markdown(res: dict) -> str:
    g, p = res["generator"], res["parquet"]
    rows = ["| what | spectra/s | MB/s | note |", "| --- | ---: | ---: | --- |"]
    for key in ("numba_1_threads", "numba_2_threads", "synth_to_parquet_2_threads", "numpy_scipy_baseline"):
        rows.append(f"| generator {key} | {g[key]['spectra_per_s']:.0f} | | {_note(g[key])} |")
    for key, val in p.items():
        if isinstance(val, dict):
            size = f"file {val['file_MB']:.1f} MB" if "file_MB" in val else "page cache warm"
            rows.append(f"| {key} | {val['spectra_per_s']:.0f} | {val['MB_per_s']:.0f} | {size} |")
    m = res["machine"]
    head = (f"# catalog_bench\n\n{m['cpu']}, {m['cores_visible']} cores visible, load average at start "
            f"{m['load_average_at_start'][0]:.1f} (above ~0.5, other jobs shared the cores). "
            f"D = {g['config']['npix']} pixels, "
            f"{g['internal_pixels']} internal; the broadening convolution costs "
            f"{g['conv_flop_per_spectrum'] / 1e6:.1f} MFLOP per spectrum. A million spectra at 2 threads: "
            f"~{g['extrapolated_minutes_per_million_2_threads']:.0f} min as measured here, "
            f"~{g['extrapolated_minutes_per_million_2_idle_cores']:.0f} min on two idle cores (from the CPU "
            f"time per spectrum, assuming two threads scale perfectly); both extrapolated from "
            f"n = {g['config']['n']}. "
            f"MB/s counts the Arrow payload ({p['bytes_per_spectrum']:.0f} B/spectrum).\n\n")
    return head + "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="spectra per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    res = {"machine": machine(), "generator": bench_generator(args.n, args.repeats),
           "parquet": bench_parquet(args.n, args.repeats)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "catalog_bench.json").write_text(json.dumps(res, indent=2))
    (RESULTS / "catalog_bench.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
