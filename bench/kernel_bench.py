"""Ensemble x MC-dropout inference, side by side in one process: the fused Triton kernel (GPU, fp16, with
the input split into two terms as shipped and without) or the CPU path (CPU) against the usual ways of
running it in torch (on a GPU in fp16, the kernel's dtype: both sides have the same tensor-core peak).

    python bench/kernel_bench.py                   # CPU: small batches, writes bench/results/kernel_cpu.*
    python bench/kernel_bench.py --device cuda     # GPU: batches 1k-64k, writes bench/results/kernel_<gpu>.*
    python bench/kernel_bench.py --device cuda --out bench/results/<device>   # what bench/gpu_check.sh runs

Baselines (DESIGN.md): `loop` — members x samples, nn.Sequential with nn.Dropout in train mode, the
whole net per sample; `vmap` — torch.func over stacked members (randomness="different"), per sample;
`einsum` — first layer once per member, then one batched matmul per layer over M x S with
torch.bernoulli masks; `compiled_einsum` — torch.compile of the einsum, the fastest of those wherever
this ran. Every chunked method (ours on the CPU, the einsums) gets the same chunk search (CHUNKS), and
every method is timed alike (`measure`). Goals are framed against the best tuned baseline per batch.
On the CPU the bench also times the CPU path's GEMMs alone at its shapes and chunk: its roofline.
FLOPs are counted as the useful work of the numerics (first layer once per member, then every
sample's hidden layers and head: M*D*H1*2 + S*M*(sum of hidden and head matmuls)*2 per spectrum) for
every method, so TFLOP/s compare like with like; the loop and vmap really do more work (the first
layer per sample).
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from starcast.kernels.ensemble_mlp import CONFIGS as CONFIGS_TRITON
from starcast.kernels.ensemble_mlp import compiled_resources
from starcast.kernels.packing import padded_width
from starcast.kernels.reference import ensemble_stats_cpu, pack_cpu

CONFIGS = {
    "seed": dict(d=4000, hidden=[256, 256], members=5, samples=32, k=3),
    "survey": dict(d=4096, hidden=[512, 512, 512], members=8, samples=64, k=3),
}
P = 0.1
# rows per chunk tried by the same search for every chunked method (ours on the CPU, the einsum
# baselines everywhere), at the config's largest batch; a batch is zero-padded to whole chunks
CHUNKS = {"cuda": [256, 1024, 4096, 16384], "cpu": [8, 16, 32, 64, 128]}  # rows: the chunk search
DEFAULT_BATCHES = {"cuda": {"seed": [1024, 4096, 16384, 65536], "survey": [1024, 4096, 16384, 65536]},
                   "cpu": {"seed": [64, 128], "survey": [16, 32]}}
RESULTS = Path(__file__).parent / "results"


def flops_per_spectrum(cfg) -> int:
    h, m, s = cfg["hidden"], cfg["members"], cfg["samples"]
    later = sum(a * b for a, b in zip(h, h[1:], strict=False)) + h[-1] * 2 * cfg["k"]
    return 2 * m * cfg["d"] * h[0] + 2 * s * m * later


def kernel_traffic(cfg, meta, elt=2):
    """Bytes the fused kernel moves between the SMs and L2/HBM per spectrum, from its loops
    (kernels/ensemble_mlp.py; computed, not measured). Per (tile, member): x re-read once per BLOCK_N
    columns of W1, W1 once, h1 written to scratch. Per chunk of SB samples: h1 read for every row and
    its masked copy written (z_1); each later hidden layer reads its input [R, HP] from scratch once
    per BLOCK_N output columns (`_dense`) and its weights once, and writes its output, except the last,
    which feeds the fp32 head in registers (head weights once). Per (member, spectrum) 3 K floats out.
    elt: bytes per weight and activation (2: fp16). Returns bytes."""
    b, sb, bn = meta["BLOCK_B"], meta["SB"], meta["BLOCK_N"]
    h, m, s, d, k = padded_width(max(cfg["hidden"])), cfg["members"], cfg["samples"], cfg["d"], cfg["k"]
    r, chunks, kp = b * sb, -(-s // sb), max(16, 1 << (k - 1).bit_length())
    dense = len(cfg["hidden"]) - 1  # hidden layers after the first
    first = b * d * 4 * (h // bn) + d * h * elt + b * h * elt
    per_chunk = 2 * r * h * elt + dense * (r * h * elt * (h // bn) + h * h * elt) + h * 2 * kp * 4
    per_chunk += max(dense - 1, 0) * r * h * elt + (r * h * elt if dense == 0 else 0)
    return m * (first + chunks * per_chunk) / b + m * 3 * k * 4


def traffic_model(configs, compiled: bool) -> str:
    """The fused kernel's FLOP/byte model for each autotune config as a markdown table; with
    `compiled`, also its registers, spills and shared memory as compiled for an H100 (sm_90)."""
    lines = ["The fused kernel's FLOP/byte model: traffic between the SMs and L2/HBM per spectrum, from its "
             "loops (fp16; computed, not measured on a GPU). Unavoidable: the input (fp32) and 3 K outputs."
             + (" Registers and spill stack per thread, shared memory per program: from the sm_90 binary "
                "Triton's ptxas builds here (`ensemble_mlp.compiled_resources`)." if compiled else ""), "",
             "| config | tile (warps, stages) | R | MB/spectrum | FLOP/B | unavoidable KB |"
             + (" regs | spill B | shared KB |" if compiled else ""),
             "| --- | --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: | ---: |" if compiled else "")]
    for name in configs:
        cfg = CONFIGS[name]
        for c in CONFIGS_TRITON:
            traffic = kernel_traffic(cfg, c.kwargs)
            rows, unavoidable = c.kwargs["BLOCK_B"] * c.kwargs["SB"], (cfg["d"] * 4 + 12 * cfg["k"]) / 1e3
            line = (f"| {name} | {c.kwargs} ({c.num_warps}, {c.num_stages}) | {rows} | {traffic / 1e6:.2f} | "
                    f"{flops_per_spectrum(cfg) / traffic:.1f} | {unavoidable:.1f} |")
            if compiled:
                use = compiled_resources(c, padded_width(max(cfg["hidden"])), len(cfg["hidden"]))
                line += f" {use['regs']} | {use['spill_bytes']} | {use['shared_bytes'] / 1024:.0f} |"
            lines.append(line)
            print(line, flush=True)
    return "\n".join(lines)


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


def measure_together(calls, device, budget_s):
    """{name: best seconds per call} of calls {name: (fn, x)}, timed alike: one warm-up call each, then
    rounds in which every fn runs once in turn, until at least 3 rounds and budget_s per fn (at most
    20). Interleaving spreads a shared machine's changing load over all of them, and the best run is
    the one it disturbed least."""
    best = {}
    with torch.no_grad():
        for fn, x in calls.values():
            fn(x)
            sync(device)
        start, rounds = time.perf_counter(), 0
        while rounds < 3 or (time.perf_counter() - start < budget_s * len(calls) and rounds < 20):
            for name, (fn, x) in calls.items():
                t0 = time.perf_counter()
                fn(x)
                sync(device)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
            rounds += 1
    return best


def measure(fn, x, device, budget_s):
    return measure_together({"": (fn, x)}, device, budget_s)[""]


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

def tune_chunk(make, x, device, budget_s, candidates):
    """The same search for every chunked method, ours included: time `make(chunk)` on x for each
    candidate chunk (rows) up to the batch, keep the fastest. Returns (its function, {chunk: seconds})."""
    fns = {c: make(c) for c in candidates if c <= x.shape[0]}
    times = measure_together({c: (fn, x) for c, fn in fns.items()}, device, budget_s)
    return fns[min(times, key=times.get)], times


def gemm_sequence(cfg, chunk, device):
    """The CPU path's matrix products alone, at its shapes and chunk (first layer [chunk, D] x [D, M*H1],
    then [M, chunk*S, H] x [H, H'] per layer, the head padded to 16 columns): its roofline."""
    m, s, hidden = cfg["members"], cfg["samples"], cfg["hidden"]
    outs = [*hidden[1:], -(-2 * cfg["k"] // 16) * 16]
    x, w1 = torch.randn(chunk, cfg["d"], device=device), torch.randn(cfg["d"], m * hidden[0], device=device)
    acts = [torch.randn(m, chunk * s, a, device=device) for a in hidden]
    ws = [torch.randn(m, a, b, device=device) for a, b in zip(hidden, outs, strict=True)]

    def run(_):
        torch.mm(x, w1)
        for a, w in zip(acts, ws, strict=True):
            torch.bmm(a, w)
    return run


def bench_config(name, cfg, device, batches, budget_s, max_call_s, compile_best):
    gpu = device.type == "cuda"
    dtype = torch.float16 if gpu else torch.float32
    layers = make_layers(cfg, device, dtype)
    layers32 = [(w.float(), b.float()) for w, b in layers]
    s, k, fl = cfg["samples"], cfg["k"], flops_per_spectrum(cfg)
    nets = sequential_members(layers)
    einsum_block = baseline_einsum(layers, s, k)
    big = max(batches)
    x_big = torch.randn(big, cfg["d"], device=device, dtype=dtype)
    search, tuning = CHUNKS[device.type], {}

    def keyed(fn):
        return lambda x_: fn(x_, torch.arange(x_.shape[0], device=device))

    if gpu:
        from starcast.kernels.ensemble_mlp import ensemble_stats_triton
        from starcast.kernels.packing import pack_weights

        def fused(precision, **packing):  # the kernel takes whole batches; it tunes its own tiles
            packed = pack_weights(layers32, precision, device, **packing)
            return keyed(lambda x, keys: ensemble_stats_triton(x, keys, packed, p=P, samples=s, seed=0,
                                                               precision=precision))
        ours = {"fused_triton_fp16": fused("fp16"),
                "fused_triton_fp16_unsplit": fused("fp16", split_input=False)}
    else:
        packed = pack_cpu(layers32, P)  # once, as the engine does

        def cpu_path(chunk):
            return keyed(lambda x, keys: ensemble_stats_cpu(x, keys, packed, p=P, samples=s, seed=0,
                                                            chunk_rows=chunk))
        ours = {}
        ours["cpu_path"], tuning["cpu_path"] = tune_chunk(cpu_path, x_big, device, budget_s, search)
    methods = {"loop": baseline_loop(nets, s, k), "vmap": baseline_vmap(nets, s, k)}
    methods["einsum"], tuning["einsum"] = tune_chunk(lambda c: chunked(einsum_block, c), x_big, device,
                                                     budget_s, search)
    if compile_best:  # the einsum is the fastest baseline wherever this ran; compiled per chunk, static
        torch._dynamo.config.recompile_limit = 64  # one compiled variant per chunk and batch shape
        methods["compiled_einsum"], tuning["compiled_einsum"] = tune_chunk(
            lambda c: chunked(torch.compile(einsum_block, dynamic=False), c), x_big, device, budget_s, search)
    print(f"{name}: chunk search (rows: seconds at B={big}) {tuning}", flush=True)
    rows, estimate = [], {}
    for batch in batches:
        x = x_big[:batch]
        x32 = x.float()
        calls = {mname: (fn, x32) for mname, fn in ours.items()}
        skipped = [m for m in methods if estimate.get(m, 0.0) * batch > max_call_s]  # predicted too slow
        calls.update({m: (fn, x) for m, fn in methods.items() if m not in skipped})
        if not gpu:  # the roofline: the CPU path's GEMMs alone at the chunk its search kept
            tuned = min(tuning["cpu_path"], key=tuning["cpu_path"].get)
            calls["gemms"] = (gemm_sequence(cfg, tuned, device), None)
        timings = measure_together(calls, device, budget_s)
        for m in methods:
            estimate[m] = timings[m] / batch if m in timings else estimate[m]
        if not gpu:
            gemms = timings.pop("gemms")
        rows.append(dict(config=name, batch=batch, seconds={**timings, **dict.fromkeys(skipped)}))
        if not gpu:
            rows[-1]["gemm_tflops_on_cpu_path_shapes"] = tuned * fl / gemms / 1e12
        report_row(rows[-1], fl)
    return rows, next(iter(ours)), {m: dict(chunks=t, best=min(t, key=t.get)) for m, t in tuning.items()}


def report_row(row, fl):
    for method, sec in row["seconds"].items():
        rate = "skipped" if sec is None else \
            f"{row['batch'] / sec:12.1f} spectra/s {row['batch'] * fl / sec / 1e12:8.3f} TFLOP/s"
        print(f"{row['config']:7s} B={row['batch']:6d} {method:26s} {rate}", flush=True)
    if "gemm_tflops_on_cpu_path_shapes" in row:
        print(f"{row['config']:7s} B={row['batch']:6d} {'GEMMs alone, same shapes':26s} "
              f"{row['gemm_tflops_on_cpu_path_shapes']:33.3f} TFLOP/s", flush=True)


BASELINES = ("loop", "vmap", "einsum", "compiled_einsum")


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
            speed = "—" if method == ours else f"{sec / mine:.2f}x"
            row.setdefault("speedup_of_ours", {})[method] = sec / mine
            table.append(f"| {row['config']} | {row['batch']} | {method} | {row['batch'] / sec:.1f} | "
                         f"{tflops:.3f} | {100 * tflops / peak:.1f}% | {speed} |")
        timed = {m: row["seconds"][m] for m in BASELINES if row["seconds"].get(m)}
        best = min(timed, key=timed.get)
        row["best_baseline"], row["ours_vs_best_baseline"] = best, timed[best] / mine
        line = f"| {row['config']} | {row['batch']} | **{ours} vs best baseline ({best})** | | | | " \
               f"**{timed[best] / mine:.2f}x** |"
        if "gemm_tflops_on_cpu_path_shapes" in row:
            frac = row["tflops"][ours] / row["gemm_tflops_on_cpu_path_shapes"]
            row["fraction_of_gemms_on_same_shapes"] = frac
            line += (f"\n| {row['config']} | {row['batch']} | GEMMs alone on {ours}'s shapes | | "
                     f"{row['gemm_tflops_on_cpu_path_shapes']:.3f} | | {ours}: **{100 * frac:.0f}%** of it |")
        table.append(line)
    return "\n".join(table)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument("--budget", type=float, default=None, help="seconds of repeats per measurement")
    parser.add_argument("--max-call", type=float, default=None, help="skip a baseline predicted slower")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--model-only", action="store_true",
                        help="only the fused kernel's FLOP/byte model and compiled resources")
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. contention)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for kernel_<device>.json/.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    budget, max_call = args.budget or (2.0 if gpu else 1.0), args.max_call or (20.0 if gpu else 30.0)
    peak_dtype = torch.float16 if gpu else torch.float32
    model = traffic_model(args.configs, compiled=args.model_only)
    if args.model_only:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernel_model.md").write_text(f"# `{' '.join(['python', *sys.argv])}`\n\n{model}\n")
        return
    peak = matmul_peak(device, peak_dtype, 8192 if gpu else 1024)
    print(f"measured {peak_dtype} matmul peak: {peak:.4f} TFLOP/s", flush=True)
    rows, tuning = [], {}
    for name in args.configs:  # the record is rewritten after each config: a run cut short keeps its part
        batches = args.batches or DEFAULT_BATCHES[device.type][name]
        cfg_rows, ours, tuning[name] = bench_config(name, CONFIGS[name], device, batches, budget, max_call,
                                                    not args.no_compile)
        rows += cfg_rows
        write(args, device, peak, peak_dtype, budget, rows, ours, tuning)


def write(args, device, peak, peak_dtype, budget, rows, ours, tuning):
    """kernel_<device>.json (everything) and .md (the table) in args.out, for the configs run so far."""
    fl = {name: flops_per_spectrum(CONFIGS[name]) for name in tuning}
    table = summarise(rows, ours, peak, fl)
    name = torch.cuda.get_device_name(device).lower() if device.type == "cuda" else "cpu"
    tag = re.sub(r"[^a-z0-9]+", "_", name).strip("_")
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python bench/kernel_bench.py " + " ".join(sys.argv[1:])
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    chunks = json.dumps({n: {m: t["best"] for m, t in v.items()} for n, v in tuning.items()})
    result = dict(machine=machine(device), note=args.note, load_average_at_end=load, command=command, p=P,
                  configs={n: CONFIGS[n] for n in tuning}, flops_per_spectrum=fl,
                  matmul_peak_tflops=peak, matmul_peak_dtype=str(peak_dtype), ours=ours,
                  chunk_search=tuning, rows=rows, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    (args.out / f"kernel_{tag}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"kernel_{tag}.md").write_text(
        f"# kernel_bench on {result['machine'].get('gpu', result['machine']['cpu'])}\n\n"
        f"`{command}`; {args.note} (load average at the end: {load})\n\n"
        f"measured {peak_dtype} matmul peak {peak:.4f} TFLOP/s; p = {P}; every method timed alike (one "
        f"warm-up call, then the best of >= 3 interleaved rounds, {budget:.0f} s per method); each chunked "
        f"method runs at the chunk (rows) its own search picked: {chunks}; 'ours vs it' = its time / our "
        f"time.\n\n"
        f"{table}\n")
    print(table, flush=True)


if __name__ == "__main__":
    main()
