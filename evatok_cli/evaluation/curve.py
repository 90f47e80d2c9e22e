"""``evatok eval curve``: the quality-cost curve of PAPER Fig. 4 (uniform levels, router and quality-target points)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from evatok_cli.assign import RouterPolicy, budget_assignments, choose_assignments, target_assignments
from evatok_cli.evaluation.engine import (
    ClipSelection,
    EvalError,
    Point,
    Scored,
    check_batch,
    finish_report,
    fvd_value,
    load_metric_weights,
    load_tokenizer,
    metric_means,
    prepare_clips,
    reduce_scores,
    resolve_metrics,
    resolve_protocol,
    savings_against,
    score_points,
)
from evatok_cli.evaluation.protocols import (
    ClipDataset,
    collate_clips,
)
from evatok_cli.evaluation.report import (
    HIGHER_IS_BETTER,
    EvalReport,
)
from evatok_cli.metrics import get_metric
from evatok_cli.runtime import DistEnv, all_gather_objects, process_group
from evatok_cli.video import to_model_input

log = logging.getLogger(__name__)

DEFAULT_W_Q = (0.8, 1.2, 1.6)  # curve: reward-head router points (w_l = 2 - w_q, PAPER §3)


def equal_quality_tokens(uniform: Sequence[tuple[float, float]], value: float, higher_is_better: bool) -> float | None:
    """Tokens the uniform curve needs to reach ``value`` (PAPER Fig. 4 "at equal quality").

    Linear interpolation in log2(tokens) between consecutive uniform points (tokens, metric),
    taking the first crossing from the fewest tokens; None when ``value`` lies outside the range
    the uniform points span.
    """
    pts = sorted((float(t), float(m)) for t, m in uniform if m is not None and math.isfinite(m))
    if not pts:
        return None
    sign = 1.0 if higher_is_better else -1.0
    q = [(math.log2(t), sign * m) for t, m in pts]
    v = sign * value
    if v <= q[0][1]:
        return pts[0][0] if v == q[0][1] else None
    for (x0, y0), (x1, y1) in zip(q, q[1:]):
        if y0 < v <= y1:
            return float(2 ** (x0 + (v - y0) / (y1 - y0) * (x1 - x0)))
    return None


def _parse_floats(values: Sequence[float] | str | None) -> list[float] | None:
    if values is None:
        return None
    if isinstance(values, str):
        try:
            return [float(x) for x in values.split(",") if x.strip()]
        except ValueError:
            raise EvalError(f"expected comma-separated numbers, got {values!r}") from None
    return [float(x) for x in values]


def _router_predictions(
    router, sel: ClipSelection, env: DistEnv, *, batch_size: int, workers: int, spec: Any
) -> np.ndarray:
    """(N, m^T) router outputs of every selected clip (all ranks gathered), for budget solving."""
    pos, preds = [], []
    loader = DataLoader(
        ClipDataset(sel.mine(env), spec), batch_size=batch_size, num_workers=workers, collate_fn=collate_clips
    )
    with torch.inference_mode():
        for batch, _ in loader:
            if batch["video"] is not None:
                preds.append(router.predict(to_model_input(batch["video"]).to(env.device)).cpu().numpy())
                pos += batch["pos"]
    parts = all_gather_objects((pos, np.concatenate(preds) if preds else None), env)
    out = np.full((len(sel.items), len(router.space)), np.nan, dtype=np.float32)
    for p, pr in parts:
        if pr is not None:
            out[np.asarray(p, dtype=np.int64)] = pr
    return out


def evaluate_curve(
    tokenizer: str | Path,
    data: Sequence[str | Path],
    *,
    router: str | Path | Sequence[str | Path] | None = None,
    w_q: Sequence[float] | str | None = None,
    budgets: Sequence[float] | str | None = None,
    targets: Sequence[float] | str | None = None,
    metrics: Sequence[str] | None = ("psnr",),
    protocol: str | None = None,
    i3d: str | Path | None = None,
    i3d_variant: str | None = None,
    lpips_weights: str | Path | None = None,
    lpips_heads: str | Path | None = None,
    lpips_net: str = "vgg",
    num_clips: int | None = None,
    clips: str | None = None,
    batch_size: int = 8,
    workers: int = 0,
    device: str = "auto",
    stdin=None,
) -> EvalReport:
    """The quality-cost curve of PAPER Fig. 4 (``evatok eval curve``).

    Points: the uniform assignment at every level, then, with a router, one point per ``w_q``
    (reward head: argmax of w_q * Q_hat - (2 - w_q) * Lz, PAPER §3; default 0.8, 1.2, 1.6) or per
    budget (reward head: mean tokens <= budget over the clips, :func:`evatok_cli.route.budget_assignments`);
    a classify head gives one point (its trade-off was fixed at training). ``targets`` add the
    paper's threshold baseline (Fig. 5): one point per value of the first metric (psnr, ssim or
    lpips), each clip at the fewest tokens that meet it block by block
    (:func:`evatok_cli.assign.target_assignments`, the reconstructions of this tokenizer). Every
    clip is decoded once and reconstructed under every point.

    Each router and threshold point also gets ``equal_quality_tokens`` (:func:`equal_quality_tokens`, on the
    first metric) and ``savings_at_equal_quality`` = 1 - mean tokens / that.

    Args: as :func:`evaluate_reconstruction`; ``metrics`` default ``psnr`` (any of psnr, ssim,
    lpips, fvd; the first one drives the savings and the plot's first panel).

    Returns:
        The :class:`EvalReport` (kind ``curve``; ``points`` and a flat ``summary``).
    """
    t0 = time.perf_counter()
    with process_group(device) as env:
        check_batch(batch_size, workers)
        names = resolve_metrics(metrics, i3d=i3d, lpips_weights=lpips_weights)
        w_qs, budget_list, target_list = _parse_floats(w_q), _parse_floats(budgets), _parse_floats(targets)
        if target_list and names[0] not in ("psnr", "ssim", "lpips"):
            raise EvalError(
                f"--targets are values of the first --metric, which must be psnr, ssim or lpips (got {names[0]})"
            )
        if router is None and (w_qs or budget_list):
            raise EvalError("--w-q and --budgets need --router")
        if w_qs and budget_list:
            raise EvalError("give either --w-q or --budgets, not both")
        tok_open, model, geometry = load_tokenizer(tokenizer, env)
        proto, why = resolve_protocol(protocol, geometry, "recon", clips=clips, i3d=i3d, i3d_variant=i3d_variant)
        space = model.space
        points = [
            Point(f"uniform-{k}", "uniform", {"k": int(k)},
                  lambda video, pred, pos, fixed=torch.tensor(space.uniform(k)): fixed.expand(video.shape[0], -1))
            for k in space.levels
        ]  # fmt: skip
        w = load_metric_weights(names, proto, env, i3d=i3d, i3d_variant=i3d_variant, lpips_weights=lpips_weights,
                          lpips_heads=lpips_heads, lpips_net=lpips_net, batch_size=batch_size)  # fmt: skip
        sel = prepare_clips(data, proto, num_clips, env, stdin)
        points += _threshold_points(model, names[0], target_list or [], w.lpips)
        router_model, router_rec = None, None
        if router is not None:
            policy = RouterPolicy.load(router, space, geometry, env.device)
            router_rec = policy.source.record()
            router_points, router_model = _router_points(policy, sel, env, w_qs=w_qs, budgets=budget_list,
                                                         batch_size=batch_size, workers=workers, spec=proto.clip_spec())  # fmt: skip
            points += router_points
        scored = reduce_scores(score_points(model, sel, points, env, metrics=names, lpips=w.lpips, fvd=w.fvd, router=router_model,
                                batch_size=batch_size, workers=workers, spec=proto.clip_spec()), env)  # fmt: skip
        deviations = why + sel.deviations + w.deviations
        if scored.failures:
            deviations.append(f"{len(scored.failures)} clips failed to decode (first: {scored.failures[0]['source']})")
        out_points, summary = _curve_points(points, scored, names, w.fvd, space, deviations, env)
        summary = {"clips": len(sel.items), **summary}
        report = EvalReport(
            kind="curve",
            protocol=sel.protocol.to_dict(),
            standard=False,
            deviations=deviations,
            test_only=w.test_only,
            summary=summary,
            models={"tokenizer": tok_open.record(), "router": router_rec},
            metric_weights=w.info,
            data=sel.record(data, len(sel.items), scored.failures),
            settings={
                "metrics": names,
                "w_q": w_qs,
                "budgets": budget_list,
                "targets": target_list,
                "batch_size": batch_size,
                "device": str(env.device),
                "num_clips": num_clips,
                "clips": clips,
                "space": space.to_dict(),
            },
            seed=proto.seed,
            points=out_points,
        )
        return finish_report(report, env, t0)


def _threshold_points(model: Any, metric: str, targets: Sequence[float], lpips: Any) -> list[Point]:
    """The threshold baseline: per target, each clip's fewest tokens meeting it (block by block)."""
    if not targets:
        return []
    block_metric = lpips if metric == "lpips" else get_metric(metric)
    return [
        Point(f"threshold-{v:g}", "threshold", {"metric": metric, "target": v},
              lambda video, pred, pos, v=v: target_assignments(model, video, block_metric, v).assignments)
        for v in targets
    ]  # fmt: skip


def _router_points(policy: RouterPolicy, sel: ClipSelection, env: DistEnv, *, w_qs: list[float] | None,
                   budgets: list[float] | None, batch_size: int, workers: int,
                   spec: Any) -> tuple[list[Point], Any]:  # fmt: skip
    """The router's curve points, and the router to run per batch (None when budgets solved them up front).

    A classify head gives one point (its trade-off was fixed at training); a reward head one point
    per w_q (w_l = 2 - w_q) or per budget (solved over all the clips at once).
    """
    model, space = policy.model, policy.space
    head, table = model.config.head, torch.as_tensor(space.table())
    if budgets and head != "reward":
        raise EvalError(f"--budgets needs a reward-head router; {policy.source.dir} has a {head!r} head")
    if head == "classify":
        if w_qs:
            log.warning("a classify-head router fixed its trade-off at training: --w-q is ignored (one point)")
        choose = lambda video, pred, pos: table[torch.as_tensor(choose_assignments(pred, "classify", space))]  # noqa: E731
        return [Point("router", "router", {"head": head}, choose)], model
    if budgets:
        preds = _router_predictions(model, sel, env, batch_size=batch_size, workers=workers, spec=spec)
        points = []
        for b in budgets:
            idx, lam = budget_assignments(preds, space, b)
            chosen = table[torch.as_tensor(idx)]
            points.append(Point(f"router-budget-{b:g}", "router", {"head": head, "budget": b, "lambda": lam},
                                lambda video, pred, pos, chosen=chosen: chosen[torch.as_tensor(pos)]))  # fmt: skip
        return points, None  # the assignments are solved: no per-batch prediction needed
    return [
        Point(f"router-wq-{q:g}", "router", {"head": head, "w_q": q, "w_l": 2.0 - q},
              lambda video, pred, pos, q=q: table[torch.as_tensor(choose_assignments(pred, "reward", space, q, 2.0 - q))])
        for q in w_qs or DEFAULT_W_Q
    ], model  # fmt: skip


def _curve_points(points: Sequence[Point], scored: Scored, names: list[str], fvd: Any, space: Any,
                  deviations: list[str], env: DistEnv) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """Each point's means (and savings at equal quality for router points), and the flat summary."""
    uniform_tokens = space.levels[-1] * space.blocks
    out_points: list[dict[str, Any]] = []
    clip_names = [m for m in names if m != "fvd"]
    for p, point in enumerate(points):
        recs = scored.records[p]
        mean_tokens = float(np.mean([r["tokens"] for r in recs])) if recs else None
        values = metric_means(recs, clip_names)
        if fvd is not None:
            res = fvd_value(fvd, scored.real, scored.fake[p], deviations) if env.is_main else None
            values["fvd"] = res["fvd"] if res else None
        out_points.append({"label": point.label, "kind": point.kind, "params": point.params, "clips": len(recs),
                           "mean_tokens": mean_tokens, "token_savings": savings_against(mean_tokens, uniform_tokens),
                           **{m: values.get(m) for m in names}})  # fmt: skip
    first = names[0]
    uni = [(pt["mean_tokens"], pt[first]) for pt in out_points if pt["kind"] == "uniform"]
    summary: dict[str, Any] = {}
    for pt in out_points:
        if pt["kind"] != "uniform":
            eq = None if pt[first] is None else equal_quality_tokens(uni, pt[first], HIGHER_IS_BETTER[first])
            pt["equal_quality_tokens"] = eq
            pt["savings_at_equal_quality"] = (
                None if eq is None or pt["mean_tokens"] is None else 1.0 - pt["mean_tokens"] / eq
            )
        summary[f"{pt['label']}/mean_tokens"] = pt["mean_tokens"]
        for m in names:
            summary[f"{pt['label']}/{m}"] = pt[m]
        if "savings_at_equal_quality" in pt:
            summary[f"{pt['label']}/savings_at_equal_{first}"] = pt["savings_at_equal_quality"]
    return out_points, summary
