"""Benchmark: evatok_kernels (fused nearest-code search, FlexAttention masks) against their baselines.

Three parts, each a subcommand; every result is printed and, with ``--json PATH``, written as JSON.

``vq``: nearest-code search of N unit vectors among K unit codes, D = 8, N in {4k, 32k, 100k},
K in {8192, 16384} (``--quick``: N in {1k, 4k}, K in {1024}).
  - CPU (``--device cpu``): the chunked torch search (what the quantizer runs on CPU, 4096 x 4096
    tiles) against naive ``torch.cdist + argmin`` (materialises N x K float32). Each case runs in
    its own subprocess; memory = peak RSS during the call minus RSS just before it (Linux: the
    peak is reset through ``/proc/self/clear_refs`` right before the call; ``VmHWM - VmRSS``),
    printed beside the analytic extra bytes. Naive cases whose N x K x 4 bytes exceed
    ``--naive-limit-gb`` (default 8) are skipped and reported as such. The Triton kernel is not
    timed on CPU (its CPU mode is Triton's interpreter, for tests only).
  - CUDA (``--device cuda``): the Triton kernel, the chunked torch search and naive cdist + argmin,
    timed with CUDA events (median of ``--repeats`` after a warm-up); memory =
    ``torch.cuda.max_memory_allocated`` during the call minus the memory allocated before it.

``tokenizer``: one forward + backward of the tokenizer (``--preset``, default ``paper``; batch
``--batch`` clips with seeded random assignments) with bf16 weights and inputs, with ``EVATOK_ATTENTION=flex``
against ``sdpa`` (dense bool masks), same weights and inputs; time (median of ``--repeats`` after
``--warmup`` steps; the first flex steps include torch.compile) and peak memory. On CPU
FlexAttention has no backward: ``--device cpu`` times the forward only (a plumbing check; eager flex
on CPU is torch's unfused reference, slow by design).

``gpt``: forward + backward of a GPT preset (``--preset``, default ``gpt-b``) on right-padded random
sequences under bf16 autocast (its own SDPA ``is_causal`` path), plus an attention-only comparison
at the same shapes: SDPA ``is_causal`` against FlexAttention with the ``causal_padded`` mask.

Usage:
    python bench/kernels.py vq --device cpu --threads 2              # the CPU numbers in docs/kernels.md
    python bench/kernels.py vq --device cpu --quick
    python bench/kernels.py tokenizer --device cpu --quick           # plumbing only (tiny preset)
    python bench/kernels.py gpt --device cpu --quick
    bash bench/gpu.sh                                                 # everything on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

MiB = 2**20


# -------------------------------------------------------------------------------- helpers
def _unit(n: int, d: int, seed: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1).to(device)


def _proc_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1))


def _cuda_timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, int]:
    """(median seconds, peak extra bytes) of fn() on CUDA."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times), torch.cuda.max_memory_allocated() - base


def _emit(results: dict, path: str | None, quiet: bool = False) -> None:
    """Write results as JSON (also after each finished case, so a timeout keeps what finished)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=2))
        if not quiet:
            print(f"wrote {path}")


# --------------------------------------------------------------------------------------- vq
def _vq_sizes(quick: bool) -> tuple[list[int], list[int]]:
    return ([1000, 4000], [1024]) if quick else ([4000, 32_000, 100_000], [8192, 16_384])


def _vq_analytic(method: str, n: int, k: int, d: int, chunk: int = 4096) -> int:
    """Extra bytes a method needs beyond its inputs (float32)."""
    if method == "naive":
        return n * k * 4 + n * 8  # (N, K) distances + indices
    if method == "chunked":
        tn, tk = min(n, chunk), min(k, chunk)
        tiles = 3 if n > chunk or k > chunk else 2  # the last tile's d lives on while the next is built
        return tiles * tn * tk * 4 + n * (8 + 4) + k * 4
    return n * (8 + 4 + 4 + 4) + (n + k) * d * 4  # triton: outputs, 1-split partials, transposed copies


def _vq_case_child(args: argparse.Namespace) -> None:
    """One CPU case, in a fresh process: prints a JSON line {time_s, rss_extra_bytes}."""
    torch.set_num_threads(args.threads)
    from evatok_kernels.vq import nearest_code_chunked

    z, c = _unit(args.n, args.d, 0, "cpu"), _unit(args.k, args.d, 1, "cpu")
    if args.method == "naive":

        def run():
            return torch.cdist(z, c).argmin(1)
    else:

        def run():
            return nearest_code_chunked(z, c)

    # warm up on a small slice (library loading, allocator), then measure the real call
    if args.method == "naive":
        torch.cdist(z[:64], c[:64]).argmin(1)
    else:
        nearest_code_chunked(z[:64], c[:64])
    rss0 = _proc_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        method = "VmHWM after clear_refs"
    except OSError:
        method = "VmHWM without reset (may under-report)"
    t0 = time.perf_counter()
    out = run()
    dt = time.perf_counter() - t0
    peak = _proc_kib("VmHWM")
    del out
    print(json.dumps({"time_s": dt, "rss_extra_bytes": (peak - rss0) * 1024, "memory_method": method}))


def bench_vq_cpu(args: argparse.Namespace) -> dict:
    ns, ks = _vq_sizes(args.quick)
    rows = []
    for k in ks:
        for n in ns:
            row: dict[str, Any] = {"N": n, "K": k, "D": 8}
            for method in ("chunked", "naive"):
                analytic = _vq_analytic(method, n, k, 8)
                row[f"{method}_analytic_bytes"] = analytic
                if method == "naive" and n * k * 4 > args.naive_limit_gb * 1e9:
                    row["naive"] = f"skipped: N*K*4 = {n * k * 4 / 1e9:.1f} GB > {args.naive_limit_gb} GB"
                    continue
                cmd = [
                    sys.executable,
                    __file__,
                    "_vq-case",
                    "--method",
                    method,
                    "--n",
                    str(n),
                    "--k",
                    str(k),
                    "--d",
                    "8",
                    "--threads",
                    str(args.threads),
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                row[method] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            _print_vq_row(row)
            _emit({"partial": True, "rows": rows}, args.json, quiet=True)
    return {"device": "cpu", "threads": args.threads, "torch": torch.__version__, "rows": rows}


def _print_vq_row(row: dict) -> None:
    def fmt(m: str) -> str:
        r = row.get(m)
        if r is None:
            return f"{m}: -"
        if isinstance(r, str):
            return f"{m}: {r}"
        extra = r.get("rss_extra_bytes", r.get("cuda_extra_bytes", 0))
        return (
            f"{m}: {r['time_s'] * 1e3:9.1f} ms, +{extra / MiB:8.1f} MiB"
            f" (analytic {row[m + '_analytic_bytes'] / MiB:8.1f} MiB)"
        )

    methods = [m for m in ("triton", "chunked", "naive") if m in row]
    print(f"N={row['N']:>6} K={row['K']:>5} | " + " | ".join(fmt(m) for m in methods), flush=True)


def bench_vq_cuda(args: argparse.Namespace) -> dict:
    from evatok_kernels.vq import nearest_code_chunked, nearest_code_reference, nearest_code_triton

    ns, ks = _vq_sizes(args.quick)
    rows = []
    for k in ks:
        for n in ns:
            z, c = _unit(n, 8, 0, "cuda"), _unit(k, 8, 1, "cuda")
            row: dict[str, Any] = {"N": n, "K": k, "D": 8}
            ref = nearest_code_triton(z, c)[0]
            methods = {
                "triton": lambda z=z, c=c: nearest_code_triton(z, c),
                "chunked": lambda z=z, c=c: nearest_code_chunked(z, c),
                "naive": lambda z=z, c=c: torch.cdist(z, c).argmin(1),
            }
            for name, fn in methods.items():
                row[f"{name}_analytic_bytes"] = _vq_analytic(name, n, k, 8)
                if name == "naive" and n * k * 4 > args.naive_limit_gb * 1e9:
                    row[name] = f"skipped: N*K*4 > {args.naive_limit_gb} GB"
                    continue
                t, mem = _cuda_timed(fn, args.repeats)
                row[name] = {"time_s": t, "cuda_extra_bytes": mem}
            exact = nearest_code_reference(z[:20_000], c)[0]
            row["index_agreement_vs_reference"] = float((ref[:20_000] == exact).float().mean())
            row["chunked_agreement"] = float((nearest_code_chunked(z, c)[0] == ref).float().mean())
            rows.append(row)
            _print_vq_row(row)
            _emit({"partial": True, "rows": rows}, args.json, quiet=True)
            del z, c
            torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}


# ------------------------------------------------------------------------------- tokenizer
def _autocast(device: str, dtype: str):
    if dtype == "fp32":
        return torch.autocast(device, enabled=False)
    return torch.autocast(device, dtype=torch.bfloat16)


def _tokenizer_step(model, video, a, backward: bool) -> None:
    if backward:
        out = model(video, a)
        (out.losses["l1"] + out.losses["vq"]).backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            model(video, a)


def bench_tokenizer(args: argparse.Namespace) -> dict:
    from evatok_cli.models.tokenizer import EVATokTokenizer, tokenizer_config

    device, preset = args.device, args.preset or ("tiny" if args.quick else "paper")
    # bf16 = weights and inputs in bf16 (the tokenizer's forward does not run under bf16 autocast:
    # its masked_scatter of the fp32 straight-through codes into bf16 tokens fails).
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    model = EVATokTokenizer(tokenizer_config(preset)).to(device, dt)
    c = model.config
    g = torch.Generator().manual_seed(0)
    video = (torch.rand(args.batch, 3, c.frames, c.height, c.width, generator=g) * 2 - 1).to(device, dt)
    levels = torch.tensor(c.levels)
    a = levels[torch.randint(len(levels), (args.batch, c.blocks), generator=g)].to(device)
    backward = device == "cuda"  # FlexAttention has no CPU backward
    res: dict[str, Any] = {
        "preset": preset,
        "batch": args.batch,
        "dtype": args.dtype,
        "device": device,
        "backward": backward,
        "assignments": a.tolist(),
        "params": model.num_parameters(),
    }
    old = os.environ.get("EVATOK_ATTENTION")
    try:
        for backend in ("sdpa", "flex"):
            os.environ["EVATOK_ATTENTION"] = backend
            try:
                res[backend] = _measure(lambda: _tokenizer_step(model, video, a, backward), device, args)
            except Exception as e:  # noqa: BLE001 - a benchmark records the failure and goes on
                traceback.print_exc()
                res[backend] = {"error": repr(e)}
            print(f"tokenizer {preset} B={args.batch} {backend}: {res[backend]}", flush=True)
            _emit({"partial": True, **res}, args.json, quiet=True)
        if "error" not in res["flex"]:
            model.eval()  # same outputs (eval mode, no grad) under both backends
            with torch.no_grad():
                os.environ["EVATOK_ATTENTION"] = "sdpa"
                ref = model(video, a)
                os.environ["EVATOK_ATTENTION"] = "flex"
                got = model(video, a)
            res["recon_max_abs_diff"] = float((got.recon.float() - ref.recon.float()).abs().max())
            res["index_agreement"] = float((got.indices == ref.indices).float().mean())
            res["flex_speedup"] = res["sdpa"]["step_s"] / res["flex"]["step_s"]
            print(
                f"flex / sdpa: {res['flex_speedup']:.2f}x faster; outputs max |diff| "
                f"{res['recon_max_abs_diff']:.3g}, index agreement {res['index_agreement']:.4f}"
            )
    finally:
        if old is None:
            os.environ.pop("EVATOK_ATTENTION", None)
        else:
            os.environ["EVATOK_ATTENTION"] = old
    return res


def _measure(step: Callable[[], Any], device: str, args: argparse.Namespace) -> dict:
    """Median step time (and on CUDA peak extra memory, warm-up time incl. compilation)."""
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        t, mem = _cuda_timed(step, args.repeats, warmup=0)
        return {"step_s": t, "peak_extra_bytes": mem, "warmup_s": warm}
    times = []
    for _ in range(args.repeats):
        t1 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t1)
    return {"step_s": statistics.median(times)}


# ------------------------------------------------------------------------------------- gpt
def bench_gpt(args: argparse.Namespace) -> dict:
    from evatok_cli.models.gpt import GPT, IGNORE_INDEX, gpt_config
    from evatok_kernels import flex

    device, preset = args.device, args.preset or ("tiny" if args.quick else "gpt-b")
    levels = (32, 64, 128, 256, 512) if not args.quick else (2, 4, 8)
    cfg = gpt_config(preset, codebook_size=8192 if not args.quick else 256, levels=levels, blocks=4, num_classes=101)
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    g = torch.Generator().manual_seed(0)
    lengths = 1 + 4 + torch.tensor(levels)[torch.randint(len(levels), (args.batch, 4), generator=g)].sum(1)
    L = int(lengths.max())
    idx = torch.randint(cfg.codebook_size, (args.batch, L), generator=g)
    targets = idx.clone()
    targets[torch.arange(L)[None, :] >= lengths[:, None]] = IGNORE_INDEX
    idx, targets = idx.to(device), targets.to(device)
    res: dict[str, Any] = {
        "preset": preset,
        "batch": args.batch,
        "seq_lengths": lengths.tolist(),
        "dtype": args.dtype,
        "params": model.num_params(),
    }

    def step():
        with _autocast(device, args.dtype):
            _, loss = model(idx, targets)
        loss.backward()
        model.zero_grad(set_to_none=True)

    res["model_fwd_bwd"] = _measure(step, device, args)
    print(f"gpt {preset} B={args.batch} L={L} fwd+bwd: {res['model_fwd_bwd']}", flush=True)
    _emit({"partial": True, **res}, args.json, quiet=True)

    # attention only: SDPA is_causal vs FlexAttention causal_padded at the GPT's shapes
    H, dh = cfg.heads, cfg.head_dim
    dt = torch.bfloat16 if (device == "cuda" and args.dtype == "bf16") else torch.float32
    q, k, v = (
        torch.randn(args.batch, H, L, dh, device=device, dtype=dt, requires_grad=device == "cuda") for _ in range(3)
    )
    bm = flex.block_mask(flex.causal_padded(lengths.to(device)), args.batch, L, L, device=device)

    def sdpa():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if device == "cuda":
            out.sum().backward()

    def flx():
        out = flex.flex_attention(q, k, v, bm)
        if device == "cuda":
            out.sum().backward()

    for name, fn in (("attn_sdpa_is_causal", sdpa), ("attn_flex_causal_padded", flx)):
        try:
            with torch.set_grad_enabled(device == "cuda"):
                res[name] = _measure(fn, device, args)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            res[name] = {"error": repr(e)}
        print(f"{name}: {res[name]}", flush=True)
        _emit({"partial": True, **res}, args.json, quiet=True)
    return res


# -------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["vq", "tokenizer", "gpt", "_vq-case"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="small sizes (dry runs)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--naive-limit-gb", type=float, default=8.0)
    p.add_argument("--preset", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    # _vq-case (internal: one CPU measurement in a fresh process)
    p.add_argument("--method", choices=["chunked", "naive"])
    p.add_argument("--n", type=int)
    p.add_argument("--k", type=int)
    p.add_argument("--d", type=int, default=8)
    args = p.parse_args(argv)
    if args.part == "_vq-case":
        return _vq_case_child(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    if args.part == "vq":
        res = bench_vq_cuda(args) if args.device == "cuda" else bench_vq_cpu(args)
    elif args.part == "tokenizer":
        args.batch = args.batch or (2 if args.quick else 8)
        if args.device == "cpu":
            args.repeats, args.warmup = min(args.repeats, 2), min(args.warmup, 1)
        res = bench_tokenizer(args)
    else:
        args.batch = args.batch or (2 if args.quick else 16)
        res = bench_gpt(args)
    res["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    _emit(res, args.json)


if __name__ == "__main__":
    main()
