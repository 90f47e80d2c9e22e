"""Evaluation people can trust: rFVD / gFVD / PSNR / SSIM / LPIPS under named protocols (PAPER §7).

Three jobs, each returning an :class:`EvalReport` (JSON for machines, markdown for people):

- :func:`evaluate_reconstruction` (``evatok eval recon``): encode and decode the protocol's clips
  with a tokenizer (uniform, fixed or router assignments); per-clip and mean PSNR / SSIM / LPIPS,
  mean tokens and the saving against the uniform assignment at the largest level, and rFVD between
  the real clips and their reconstructions.
- :func:`evaluate_generation` (``evatok eval gen``): gFVD of class-conditional GPT samples against
  the protocol's real clips; the real statistics are cached on disk, keyed by the inputs listing,
  the protocol and the I3D weights.
- :func:`evaluate_curve` (``evatok eval curve``): the quality-cost curve of PAPER Fig. 4: a metric
  against mean tokens for every uniform level and for a router at several w_q (w_l = 2 - w_q) or
  token budgets, with the uniform tokens each router point saves at equal quality.

Every job runs as one process or under ``torchrun``: clips (and generated samples) are split over
ranks, FVD statistics are summed with ``FeatureStats.all_reduce`` and per-clip records gathered, so
the report does not depend on the number of ranks (clip starts and sampler seeds are per clip /
per chunk, never per rank). Rank 0 holds the full report; other ranks return theirs with partial
contents (``rank`` > 0) and should not write it.

Which clips a job reads is the protocol's business (:mod:`evatok_cli.evaluation.protocols`: presets, clip
planning, subsets); what a job returns is an :class:`~evatok_cli.evaluation.report.EvalReport`
(:mod:`evatok_cli.evaluation.report`: JSON, markdown, comparison, plots). A report records the protocol
(and how the run deviated from it), the sha256 of every set of weights involved (tokenizer, router,
GPT, I3D, LPIPS backbone and heads), the evatok version and the seeds.
:func:`~evatok_cli.evaluation.report.compare_reports` refuses reports made under different protocols or
metric weights. ``random:SEED`` instead of a weights path builds seeded random I3D / LPIPS networks: for
tests only, and such reports say so.

Modules: :mod:`~evatok_cli.evaluation.engine` (what the jobs share), one module per job
(:mod:`~evatok_cli.evaluation.recon`, :mod:`~evatok_cli.evaluation.gen`,
:mod:`~evatok_cli.evaluation.curve`), :mod:`~evatok_cli.evaluation.protocols` and
:mod:`~evatok_cli.evaluation.report`.
"""

from __future__ import annotations

from evatok_cli.evaluation.curve import equal_quality_tokens, evaluate_curve
from evatok_cli.evaluation.engine import EvalError, Point, load_fvd, load_lpips
from evatok_cli.evaluation.gen import default_cache_dir, evaluate_generation, real_stats_key
from evatok_cli.evaluation.protocols import listing_sha256, plan_clips
from evatok_cli.evaluation.recon import evaluate_reconstruction
from evatok_cli.evaluation.report import (
    EvalReport,
    NotComparable,
    comparable,
    compare_reports,
    load_report,
    matplotlib_available,
    plot_curve,
    render_markdown,
    write_report,
)

__all__ = [
    "EvalError",
    "EvalReport",
    "NotComparable",
    "Point",
    "comparable",
    "compare_reports",
    "default_cache_dir",
    "equal_quality_tokens",
    "evaluate_curve",
    "evaluate_generation",
    "evaluate_reconstruction",
    "listing_sha256",
    "load_fvd",
    "load_lpips",
    "load_report",
    "matplotlib_available",
    "plan_clips",
    "plot_curve",
    "real_stats_key",
    "render_markdown",
    "write_report",
]
