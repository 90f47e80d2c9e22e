"""Benchmark: AR sampling speed with and without the KV cache, and adaptive vs uniform lengths.

Random (untrained) weights of a GPT preset on the paper's space (codebook 8192, levels
{32..512}, 4 blocks, 101 classes), batch 1, float32, sampling at temperature 1. Assignments are
forced (``generate(force_assignment=...)``) so that the work per sequence is known in advance.

1. KV cache: tokens/s of ``generate`` (cached) on uniform 1024-token sequences (256 x 4).
   The uncached reference (``generate_uncached``) recomputes the whole prefix at every step; a full
   1024-token run takes tens of minutes on CPU, so it is
   (a) run for real on the shortest sequence of the space (32 x 4 = 128 tokens), next to the cached
       sampler on the same sequence: a measured speedup;
   (b) extrapolated to 1024 tokens: the time of one uncached step (a forward over a prefix of
       length L, exactly what ``generate_uncached`` runs) is measured at several L, interpolated
       linearly between them and summed over every step of the sequence. Labelled as an estimate.
2. Adaptive vs uniform: cached wall time of a mix of adaptive assignments (mean ~757 tokens, near
   the paper's 756 gTokens) vs uniform 1024, reported as the time ratio next to the token ratio.
   Uniform and adaptive runs alternate so that load drift on a shared machine hits both alike.

Usage:
    python bench/generate.py --threads 1            # gpt-b, 3 uniform + 3 adaptive sequences
    python bench/generate.py --preset tiny --quick # smoke run
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from evatok_cli.models.gpt import GPT, gpt_config
from evatok_cli.sampling import generate, generate_uncached

SPACE = dict(codebook_size=8192, levels=(32, 64, 128, 256, 512), blocks=4, num_classes=101)
UNIFORM = (256, 256, 256, 256)
ADAPTIVE = [(512, 128, 64, 64), (256, 256, 128, 64), (512, 128, 128, 32)]  # 768, 704, 800: mean 757.3
SHORT = (32, 32, 32, 32)
WALL = False


def timed(fn) -> float:
    """Process CPU time of ``fn`` (or wall time with ``--wall``).

    CPU time is the default because the development machine is shared: other jobs stretch wall
    time by up to 2x within one run, but barely change the CPU time a single-threaded run uses.
    """
    clock = time.perf_counter if WALL else time.process_time
    t0 = clock()
    fn()
    return clock() - t0


def sample_time(model: GPT, assignment, *, cached: bool, seed: int) -> float:
    fn = generate if cached else generate_uncached
    g = torch.Generator().manual_seed(seed)
    return timed(lambda: fn(model, torch.tensor([seed % 101]), force_assignment=list(assignment), generator=g))


def uncached_step_time(model: GPT, prefix: int, reps: int) -> float:
    ids = torch.randint(0, 8192, (1, prefix))
    with torch.inference_mode():
        model(ids)  # warm-up
        return min(timed(lambda: model(ids)) for _ in range(reps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt-b")
    ap.add_argument("--seqs", type=int, default=3, help="uniform and adaptive sequences to time each (cached)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="fewer prefixes / repetitions (smoke run)")
    ap.add_argument("--wall", action="store_true", help="time with the wall clock instead of process CPU time")
    args = ap.parse_args()
    global WALL
    WALL = args.wall
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(gpt_config(args.preset, **SPACE)).eval()
    print(f"preset {args.preset}: {model.num_params() / 1e6:.1f}M params, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU float32, batch 1, {'wall' if WALL else 'process CPU'} time")  # fmt: skip
    sample_time(model, SHORT, cached=True, seed=99)  # warm-up

    # uniform and adaptive runs interleaved, so that load drift on a shared machine hits both alike
    t_uniform, t_adaptive = [], []
    for i in range(args.seqs):
        t_uniform.append(sample_time(model, UNIFORM, cached=True, seed=i))
        t_adaptive.append(sample_time(model, ADAPTIVE[i % len(ADAPTIVE)], cached=True, seed=10 + i))

    # 1. KV cache vs recompute
    steps_u = sum(UNIFORM) + len(UNIFORM)  # decode steps = codebook ids + length tokens
    cached_tps = sum(UNIFORM) / np.mean(t_uniform)
    print(f"cached   1024-token sequences: {np.mean(t_uniform):.2f} s each ({args.seqs} runs: "
          f"{', '.join(f'{t:.2f}' for t in t_uniform)}), {cached_tps:.1f} tokens/s")  # fmt: skip

    t_short_c = sample_time(model, SHORT, cached=True, seed=1)
    t_short_u = sample_time(model, SHORT, cached=False, seed=1)
    print(f"measured  128-token sequence: cached {t_short_c:.2f} s, uncached {t_short_u:.2f} s, "
          f"speedup {t_short_u / t_short_c:.1f}x")  # fmt: skip

    prefixes = [1, 256, 1028] if args.quick else [1, 128, 256, 512, 768, 1028]
    reps = 1 if args.quick else 2
    step_t = [uncached_step_time(model, p, reps) for p in prefixes]
    est_u = float(np.sum(np.interp(np.arange(1, steps_u + 1), prefixes, step_t)))
    print("uncached step (forward over a prefix of L ids): "
          + ", ".join(f"L={p}: {t * 1e3:.0f} ms" for p, t in zip(prefixes, step_t)))  # fmt: skip
    print(f"uncached 1024-token sequence (ESTIMATE, summed over {steps_u} steps): {est_u:.0f} s, "
          f"{sum(UNIFORM) / est_u:.2f} tokens/s -> KV-cache speedup ~{est_u / np.mean(t_uniform):.0f}x")  # fmt: skip

    # 2. adaptive vs uniform lengths (cached, timed above)
    adaptive = [ADAPTIVE[i % len(ADAPTIVE)] for i in range(args.seqs)]
    mean_tokens = float(np.mean([sum(a) for a in adaptive]))
    time_ratio = float(np.mean(t_adaptive)) / float(np.mean(t_uniform))
    step_ratio = (mean_tokens + 4) / steps_u
    print(f"adaptive {adaptive}: mean {mean_tokens:.1f} tokens, {np.mean(t_adaptive):.2f} s per sequence "
          f"({', '.join(f'{t:.2f}' for t in t_adaptive)})")  # fmt: skip
    print(f"adaptive/uniform: time ratio {time_ratio:.3f}, token ratio {mean_tokens / sum(UNIFORM):.3f} "
          f"(decode-step ratio incl. length tokens {step_ratio:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
