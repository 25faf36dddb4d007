"""Preprocessing speed: the Numba kernels (`starcast.kernels.preprocess`) against a straightforward
NumPy/SciPy implementation of the same steps (Doppler shift, `spectres` flux-conserving rebinning with
errors, the same clipped Chebyshev continuum fit, gap filling), in one process on the same batch.
The kernel also screens every input pixel for cosmic-ray hits (`spike_sigma`); the baseline does not
(on these clean spectra the kernel masks none, so the outputs agree), so its cost counts against the
kernel only.

Run: `python bench/preprocess_bench.py [--rows 1024] [--baseline-rows 48]`. Writes
bench/results/preprocess.json and bench/results/preprocess.md. Spectra/s per core single-threaded
(numba.set_num_threads(1), BLAS pinned to one thread) and the kernel's scaling on 2 threads.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # the baseline's BLAS on one core
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import scipy  # noqa: E402
import spectres  # noqa: E402
from spectres.spectral_resampling_numba import spectres_numba  # noqa: E402
from starcast.catalogs.physics import C_KMS  # noqa: E402
from starcast.catalogs.synth import SynthConfig, arrays_to_table, synth_arrays  # noqa: E402
from starcast.kernels.continuum import CONVERGED, continuum_basis  # noqa: E402
from starcast.kernels.preprocess import PreprocessSettings, preprocess  # noqa: E402
from starcast.kernels.resample import rest_frame_factor  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def numpy_preprocess(wavelength, flux, err, rv, grid, s: PreprocessSettings, rebin=spectres.spectres):
    """The same steps as the kernel, one spectrum at a time with NumPy/SciPy (`spectres` rebinning)."""
    basis = continuum_basis(grid, s.continuum_degree)[0].T  # (D, K)
    d, half = len(grid), s.clip_window // 2
    idx = np.arange(d)
    lo, hi = np.clip(idx - half, 0, d), np.clip(idx + half + 1, 0, d)
    out = np.empty((len(flux), d), np.float32)
    for i in range(len(flux)):
        beta = rv[i] / C_KMS
        rest = wavelength * np.sqrt((1 - beta) / (1 + beta))  # relativistic Doppler, as the kernel
        f = flux[i].astype(np.float64)
        e = err[i].astype(np.float64)
        bad = ~(np.isfinite(f) & (f >= 0) & (e > 0) & np.isfinite(e))
        y, ye = rebin(grid, rest, np.where(bad, np.nan, f), spec_errs=np.where(bad, np.nan, e),
                      fill=np.nan, verbose=False)
        good = np.isfinite(y)
        sigma = np.maximum(np.where(good, ye, 1.0), s.sigma_floor * abs(np.mean(y[good])))
        edges = np.concatenate([[1.5 * grid[0] - 0.5 * grid[1]], [1.5 * grid[-1] - 0.5 * grid[-2]]])
        inside = np.sum(~bad & (rest >= edges[0]) & (rest <= edges[1]))
        correlation = max(1.0, good.sum() / inside)  # grid pixels per input pixel
        tolerance = CONVERGED * np.sqrt(np.mean(sigma[good] ** 2))
        keep, previous = good.copy(), np.inf
        for _ in range(s.max_iter):
            coef = np.linalg.lstsq(basis[keep], y[keep], rcond=None)[0]
            cont = basis @ coef
            if np.sum(np.abs(coef - previous)) < tolerance:  # bounds the change of the fit, |T_p| <= 1
                break
            previous = coef
            r = np.where(good, y - cont, 0.0)
            sums = [np.concatenate([[0.0], np.cumsum(a)]) for a in (r, np.where(good, sigma**2, 0), good)]
            n = sums[2][hi] - sums[2][lo]
            mean_r = (sums[0][hi] - sums[0][lo]) / n
            sigma_mean = np.sqrt(np.minimum(correlation, n) * (sums[1][hi] - sums[1][lo])) / n
            new = good & (r > -s.clip_low * sigma) & (mean_r > -s.clip_window_low * sigma_mean) & (
                r - mean_r < s.clip_high * sigma)
            min_keep = max(basis.shape[1] + 1, int(s.min_keep_fraction * good.sum()))
            if new.sum() < min_keep or (new == keep).all():
                break
            keep = new
        else:
            cont = basis @ np.linalg.lstsq(basis[keep], y[keep], rcond=None)[0]
        x = np.where(good, y / cont, 1.0)
        gaps = np.flatnonzero(np.diff(np.concatenate([[0], (~good).astype(int), [0]])))
        for a, b in zip(gaps[::2], gaps[1::2], strict=True):
            if a > 0 and b < d and b - a <= s.max_gap:
                x[a:b] = np.interp(np.arange(a, b), [a - 1, b], [x[a - 1], x[b]])
        out[i] = x
    return out


def timed(fn, repeats: int, rows: int, threads: int) -> dict:
    """Best wall time of `repeats` runs, and the CPU time (all threads) of the same runs: on a shared
    machine spectra per CPU-second is the per-core figure that contention distorts least."""
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return {"threads": threads, "seconds": min(wall), "spectra_per_s": rows / min(wall),
            "cpu_seconds": min(cpu), "spectra_per_cpu_s": rows / min(cpu)}


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "logical_cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "load_average_1m_before": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--baseline-rows", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    config = SynthConfig(n=args.rows, seed=1, npix=4000)  # D = 4000, SNR 50-300, v sin i 0-450, rv +-150
    arrays = synth_arrays(config)
    table = arrays_to_table(arrays, config)
    grid, settings = arrays.wavelength, PreprocessSettings()
    info = {"machine": machine(), "versions": {
        "numpy": np.__version__, "numba": numba.__version__, "scipy": scipy.__version__,
        "pyarrow": pa.__version__, "spectres": metadata.version("spectres"),
        "starcast": metadata.version("starcast"),
        "numba_threading_layer": None},
        "config": {"rows": args.rows, "baseline_rows": args.baseline_rows, "pixels": len(grid),
                   "settings": settings.to_dict(), "input": "fixed_size_list<float32> flux + flux_err, rv"},
        "command": " ".join(["python", "bench/preprocess_bench.py", *sys.argv[1:]])}

    preprocess(table.slice(0, 8), grid, settings)  # compile (or load the cache) outside the timing
    info["versions"]["numba_threading_layer"] = numba.threading_layer()
    results = {}
    for threads in (1, 2):
        numba.set_num_threads(threads)
        results[f"numba_{threads}_thread"] = timed(lambda: preprocess(table, grid, settings), args.repeats,
                                                   args.rows, threads)
    numba.set_num_threads(1)
    # the same rows remade on their own grid's pixels, as a model states its training spectra's
    # (`input.training_pixels`): those whose rv puts them more than a quarter pixel off their centres
    results["numba_1_thread_remade"] = timed(lambda: preprocess(table, grid, settings, observed=grid),
                                             args.repeats, args.rows, 1)
    phase = np.stack([(grid[[0, -1]] * rest_frame_factor(rv) - grid[0]) / (grid[1] - grid[0])
                      for rv in arrays.rv])
    results["numba_1_thread_remade"]["remade_fraction"] = float(
        np.mean(np.abs(phase - np.round(phase)).max(axis=1) > 0.25))
    m = args.baseline_rows
    base_args = (grid, arrays.flux[:m], arrays.flux_err[:m], arrays.rv[:m], grid, settings)
    reference = preprocess(table.slice(0, m), grid, settings).x
    for name, rebin in (("numpy_scipy_spectres", spectres.spectres),
                        ("numpy_scipy_spectres_numba", spectres_numba)):
        rebin(grid, grid, arrays.flux[0].astype(np.float64), spec_errs=arrays.flux_err[0].astype(np.float64),
              fill=np.nan, verbose=False)  # compile spectres_numba outside the timing
        results[name] = timed(lambda rebin=rebin: numpy_preprocess(*base_args, rebin=rebin), args.repeats, m,
                              1)  # best of as many runs as the kernel: both sides timed alike
        x = numpy_preprocess(*base_args, rebin=rebin)
        results[name]["max_abs_diff_vs_kernel"] = float(np.max(np.abs(x - reference)))
    info["results"] = results
    kernel, kernel2 = results["numba_1_thread"], results["numba_2_thread"]
    info["summary"] = {
        **{f"speedup_per_core_vs_{name}": kernel["spectra_per_s"] / results[name]["spectra_per_s"]
           for name in ("numpy_scipy_spectres", "numpy_scipy_spectres_numba")},
        **{f"speedup_per_cpu_s_vs_{name}": kernel["spectra_per_cpu_s"] / results[name]["spectra_per_cpu_s"]
           for name in ("numpy_scipy_spectres", "numpy_scipy_spectres_numba")},
        "parallel_scaling_2_threads_wall": kernel2["spectra_per_s"] / kernel["spectra_per_s"],
        "parallel_cpu_efficiency_2_threads": kernel2["spectra_per_cpu_s"] / kernel["spectra_per_cpu_s"],
        "kernel_spectra_per_cpu_s": kernel["spectra_per_cpu_s"],
        "remade_cost_per_core": (kernel["spectra_per_cpu_s"]
                                 / results["numba_1_thread_remade"]["spectra_per_cpu_s"]),
    }
    info["machine"]["load_average_1m_after"] = os.getloadavg()[0]

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "preprocess.json").write_text(json.dumps(info, indent=2) + "\n")
    (RESULTS / "preprocess.md").write_text(markdown(info))
    print(markdown(info))


def markdown(info: dict) -> str:
    m, results = info["machine"], info["results"]
    before, after = m["load_average_1m_before"], m["load_average_1m_after"]
    lines = [f"# Preprocessing, D = {info['config']['pixels']} pixels", "",
             f"{m['cpu']}, {m['logical_cores']} logical cores; load "
             f"average (1 min) {before:.1f} before, {after:.1f} after. Command: `{info['command']}`.", "",
             "| implementation | threads | spectra/s (wall) | spectra per CPU-second | max abs diff of x |",
             "| --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        diff = r.get("max_abs_diff_vs_kernel")
        lines.append(f"| {name} | {r['threads']} | {r['spectra_per_s']:.1f} | {r['spectra_per_cpu_s']:.1f} | "
                     f"{'-' if diff is None else f'{diff:.1e}'} |")
    sm = info["summary"]
    lines += ["", "Per core (1 thread, wall / CPU time), the kernel is "
              f"{sm['speedup_per_core_vs_numpy_scipy_spectres']:.0f}x / "
              f"{sm['speedup_per_cpu_s_vs_numpy_scipy_spectres']:.0f}x NumPy/SciPy with `spectres`, and "
              f"{sm['speedup_per_core_vs_numpy_scipy_spectres_numba']:.1f}x / "
              f"{sm['speedup_per_cpu_s_vs_numpy_scipy_spectres_numba']:.1f}x NumPy/SciPy with "
              "`spectres_numba` (x: difference from the kernel's output). "
              f"On 2 threads: {sm['parallel_scaling_2_threads_wall']:.2f}x wall-clock scaling, "
              f"{sm['parallel_cpu_efficiency_2_threads']:.2f} CPU efficiency (spectra per CPU-second, 2 vs 1 "
              "thread); wall-clock scaling needs two idle cores.", "",
              "Model: per spectrum the kernel reads 32 KB (flux + flux_err, float32) and writes 32 KB "
              f"(x + ivar): {0.064 * sm['kernel_spectra_per_cpu_s']:.0f} MB/s per core at the measured rate, "
              "far from memory bandwidth, so it is compute bound. Estimated work: rebinning ~16 flop/pixel, "
              "each clipping iteration of the continuum fit ~15 flop/pixel (fit evaluation, running sums, "
              "tests) over 4-8 iterations, ~0.5 Mflop per 4000-pixel spectrum in all: about "
              f"{0.5e-3 * sm['kernel_spectra_per_cpu_s']:.1f} Gflop/s per core of scalar, branchy code with "
              "sequential prefix sums. The NumPy/SciPy baseline pays Python overhead per spectrum and per "
              "clipping iteration, and `spectres` loops over the output pixels in Python.", "",
              "Remade on the training spectra's own pixels (`numba_1_thread_remade`: a model's "
              "`input.training_pixels`, here the input grid itself, off whose centres "
              f"{100 * results['numba_1_thread_remade']['remade_fraction']:.0f}% of these rows lie by more "
              f"than a quarter pixel by their rv), the rows cost {sm['remade_cost_per_core']:.1f}x per "
              "core: the cubic spline "
              "at each of 4000 pixels weighs 18 input pixels (~130 flop), and the variance of each model "
              "pixel gathers those weights again (~80 flop), ~0.8 Mflop beside the ~0.5 above.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
