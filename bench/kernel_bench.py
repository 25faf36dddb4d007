"""Ensemble x MC-dropout inference, side by side in one process: the fused Triton kernel (GPU, fp16 by
default and bf16) or the CPU path (CPU) against the usual ways of running it in torch (bf16 on a GPU).

    python bench/kernel_bench.py                   # CPU: small batches, writes bench/results/kernel_cpu.*
    python bench/kernel_bench.py --device cuda     # GPU: batches 1k-64k, writes bench/results/kernel_<gpu>.*

Baselines (DESIGN.md): `loop` — members x samples, nn.Sequential with nn.Dropout in train mode, the
whole net per sample; `vmap` — torch.func over stacked members (randomness="different"), per sample;
`einsum` — first layer once per member, then one batched matmul per layer over M x S with
torch.bernoulli masks; `compiled` — torch.compile of the fastest of those. FLOPs are counted as the
useful work of the numerics (first layer once per member, then every sample's hidden layers and
head: M*D*H1*2 + S*M*(sum of hidden and head matmuls)*2 per spectrum) for every method, so TFLOP/s
compare like with like; the loop and vmap really do more work (the first layer per sample).
"""

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from starcast.kernels.reference import ensemble_stats_cpu

CONFIGS = {
    "seed": dict(d=4000, hidden=[256, 256], members=5, samples=32, k=3),
    "survey": dict(d=4096, hidden=[512, 512, 512], members=8, samples=64, k=3),
}
P = 0.1
# CPU batches are multiples of the CPU path's fixed chunk (64 rows for seed, 16 for survey), which it
# pads to so that a row's result never depends on its batch
DEFAULT_BATCHES = {"cuda": {"seed": [1024, 4096, 16384, 65536], "survey": [1024, 4096, 16384, 65536]},
                   "cpu": {"seed": [64, 128], "survey": [16, 32]}}
RESULTS = Path(__file__).parent / "results"


def flops_per_spectrum(cfg) -> int:
    h, m, s = cfg["hidden"], cfg["members"], cfg["samples"]
    later = sum(a * b for a, b in zip(h, h[1:], strict=False)) + h[-1] * 2 * cfg["k"]
    return 2 * m * cfg["d"] * h[0] + 2 * s * m * later


def make_layers(cfg, device, dtype):
    dims, gen = [cfg["d"], *cfg["hidden"], 2 * cfg["k"]], torch.Generator().manual_seed(0)
    return [((torch.randn(cfg["members"], i, o, generator=gen) / i ** 0.5).to(device, dtype),
             (0.1 * torch.randn(cfg["members"], o, generator=gen)).to(device, dtype))
            for i, o in zip(dims, dims[1:], strict=False)]


def reduce_stats(mu, var):
    """mu, var [..., B, K] stacked over passes on dim 0 -> mean, aleatoric, epistemic."""
    mean = mu.mean(0)
    return mean, var.mean(0), ((mu - mean) ** 2).mean(0)


# ---- baselines ---------------------------------------------------------------------------------

def sequential_members(layers):
    nets = []
    for m in range(layers[0][0].shape[0]):
        mods = []
        for i, (w, b) in enumerate(layers):
            lin = torch.nn.Linear(w.shape[1], w.shape[2], device=w.device, dtype=w.dtype)
            lin.weight.data, lin.bias.data = w[m].T.contiguous(), b[m].clone()
            mods.append(lin)
            if i < len(layers) - 1:
                mods += [torch.nn.ReLU(), torch.nn.Dropout(P)]
        nets.append(torch.nn.Sequential(*mods).train())  # train mode: dropout on, as MC dropout is run
    return nets


def baseline_loop(nets, samples, k):
    def run(x):
        outs = torch.stack([net(x) for net in nets for _ in range(samples)])
        return reduce_stats(outs[..., :k], F.softplus(outs[..., k:]) + 1e-6)
    return run


def baseline_vmap(nets, samples, k):
    params, buffers = torch.func.stack_module_state(nets)
    base = nets[0]

    def one(p, b, x):
        return torch.func.functional_call(base, (p, b), (x,))
    member_forward = torch.func.vmap(one, in_dims=(0, 0, None), randomness="different")

    def run(x):
        outs = torch.cat([member_forward(params, buffers, x) for _ in range(samples)])
        return reduce_stats(outs[..., :k], F.softplus(outs[..., k:]) + 1e-6)
    return run


def chunked(block, chunk):
    """Run block over row chunks (bounds the [M, chunk*S, H] activations) and concatenate."""
    def run(x):
        parts = [block(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)]
        return tuple(torch.cat(t) for t in zip(*parts, strict=True))
    return run


def baseline_einsum(layers, samples, k):
    scale = 1.0 / (1.0 - P)

    def block(x):
        h = torch.relu(torch.einsum("bd,mdh->mbh", x, layers[0][0]) + layers[0][1][:, None])
        m, n, _ = h.shape
        h = h[:, :, None].expand(m, n, samples, -1)
        for w, b in layers[1:]:
            h = h * torch.bernoulli(torch.full_like(h, 1.0 - P)) * scale
            out = torch.baddbmm(b[:, None], h.reshape(m, n * samples, -1), w)
            h = torch.relu(out).view(m, n, samples, -1)
        out = out.view(m, n, samples, -1).transpose(1, 2).reshape(m * samples, n, -1)
        return reduce_stats(out[..., :k], F.softplus(out[..., k:]) + 1e-6)
    return block


# ---- timing ------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, x, device, budget_s):
    """Median seconds per call after one warm-up call; repeats within budget_s (at least once)."""
    with torch.no_grad():
        fn(x)
        sync(device)
        times = []
        while not times or (sum(times) < budget_s and len(times) < 20):
            t0 = time.perf_counter()
            fn(x)
            sync(device)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_peak(device, dtype, n):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = measure(lambda _: a @ b, None, device, 1.0)
    return 2 * n ** 3 / seconds / 1e12


def machine(device):
    cpu = platform.processor()
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    info = dict(cpu=cpu, cores=torch.get_num_threads(), python=sys.version.split()[0],
                torch=torch.__version__)
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True).stdout.strip()
    return info


# ---- the run -----------------------------------------------------------------------------------

def bench_config(name, cfg, device, batches, budget_s, max_call_s, compile_best):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layers = make_layers(cfg, device, dtype)
    layers32 = [(w.float(), b.float()) for w, b in layers]
    s, k, fl = cfg["samples"], cfg["k"], flops_per_spectrum(cfg)
    nets = sequential_members(layers)
    chunk = 512 if device.type == "cuda" else 16
    einsum_block = baseline_einsum(layers, s, k)
    methods = {"loop": baseline_loop(nets, s, k), "vmap": baseline_vmap(nets, s, k),
               "einsum": chunked(einsum_block, chunk)}
    extra = {}
    if device.type == "cuda":
        from starcast.kernels.ensemble_mlp import ensemble_stats_triton, pack_weights

        def fused(precision):
            packed = pack_weights(layers32, precision, device)
            return lambda x, keys: ensemble_stats_triton(x, keys, packed, p=P, samples=s, seed=0,
                                                         precision=precision)
        ours = ("fused_triton_fp16", fused("fp16"))  # the default precision
        extra["fused_triton_bf16"] = fused("bf16")
    else:
        ours = ("cpu_path", lambda x, keys: ensemble_stats_cpu(x, keys, layers32, p=P, samples=s, seed=0))
    rows, estimate = [], {}
    for batch in batches:
        x32 = torch.randn(batch, cfg["d"], device=device)
        x, keys = x32.to(dtype), torch.arange(batch, device=device)
        timings = {ours[0]: measure(lambda x_, keys=keys: ours[1](x_, keys), x32, device, budget_s)}
        for ename, efn in extra.items():
            timings[ename] = measure(lambda x_, keys=keys, efn=efn: efn(x_, keys), x32, device, budget_s)
        for mname, fn in methods.items():
            guess = estimate.get(mname, 0.0) * batch
            if guess > max_call_s:
                timings[mname] = None  # skipped: the last batch predicts more than max_call_s per call
                continue
            timings[mname] = measure(fn, x, device, budget_s)
            estimate[mname] = timings[mname] / batch
        rows.append(dict(config=name, batch=batch, seconds=timings))
        report_row(rows[-1], fl)
    if compile_best:
        best = min(methods, key=lambda m: estimate.get(m, float("inf")))
        fn = chunked(torch.compile(einsum_block), chunk) if best == "einsum" else torch.compile(methods[best])
        for row in rows:
            x = torch.randn(row["batch"], cfg["d"], device=device, dtype=dtype)
            guess = estimate.get(best, 0.0) * row["batch"]
            seconds = None if guess > max_call_s else measure(fn, x, device, budget_s)
            row["seconds"][f"compiled_{best}"] = seconds
            report_row(row, fl, only=f"compiled_{best}")
    return rows, ours[0]


def report_row(row, fl, only=None):
    for method, sec in row["seconds"].items():
        if only and method != only:
            continue
        rate = "skipped" if sec is None else \
            f"{row['batch'] / sec:12.1f} spectra/s {row['batch'] * fl / sec / 1e12:8.3f} TFLOP/s"
        print(f"{row['config']:7s} B={row['batch']:6d} {method:22s} {rate}", flush=True)


def summarise(rows, ours, peak, fl):
    table = ["| config | batch | method | spectra/s | TFLOP/s | % of peak | ours vs it |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        mine = row["seconds"][ours]
        for method, sec in row["seconds"].items():
            if sec is None:
                table.append(f"| {row['config']} | {row['batch']} | {method} | skipped | | | |")
                continue
            tflops = row["batch"] * fl[row["config"]] / sec / 1e12
            row.setdefault("spectra_per_s", {})[method] = row["batch"] / sec
            row.setdefault("tflops", {})[method] = tflops
            row.setdefault("fraction_of_peak", {})[method] = tflops / peak
            speed = "—" if method == ours else f"{sec / mine:.1f}x"
            row.setdefault("speedup_of_ours", {})[method] = sec / mine
            table.append(f"| {row['config']} | {row['batch']} | {method} | {row['batch'] / sec:.1f} | "
                         f"{tflops:.3f} | {100 * tflops / peak:.1f}% | {speed} |")
    return "\n".join(table)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument("--budget", type=float, default=None, help="seconds of repeats per measurement")
    parser.add_argument("--max-call", type=float, default=None, help="skip a baseline predicted slower")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. contention)")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    budget, max_call = args.budget or (2.0 if gpu else 1.0), args.max_call or (20.0 if gpu else 30.0)
    peak_dtype = torch.bfloat16 if gpu else torch.float32
    peak = matmul_peak(device, peak_dtype, 8192 if gpu else 1024)
    print(f"measured {peak_dtype} matmul peak: {peak:.4f} TFLOP/s", flush=True)
    rows, ours = [], None
    for name in args.configs:
        batches = args.batches or DEFAULT_BATCHES[device.type][name]
        cfg_rows, ours = bench_config(name, CONFIGS[name], device, batches, budget, max_call,
                                      not args.no_compile)
        rows += cfg_rows
    fl = {name: flops_per_spectrum(CONFIGS[name]) for name in args.configs}
    table = summarise(rows, ours, peak, fl)
    tag = "cpu" if not gpu else re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower())
    tag = tag.strip("_")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = dict(machine=machine(device), note=args.note, p=P, configs={n: CONFIGS[n] for n in args.configs},
                  flops_per_spectrum=fl, matmul_peak_tflops=peak, matmul_peak_dtype=str(peak_dtype),
                  ours=ours, rows=rows, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    (RESULTS / f"kernel_{tag}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"kernel_{tag}.md").write_text(
        f"# kernel_bench on {result['machine'].get('gpu', result['machine']['cpu'])}\n\n"
        f"{args.note}\n\nmeasured {peak_dtype} matmul peak {peak:.4f} TFLOP/s; p = {P}; "
        f"'ours vs it' = its time / our time.\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
