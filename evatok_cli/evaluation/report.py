"""Evaluation reports: JSON for machines, markdown for people, side-by-side comparison, curve plots.

An :class:`EvalReport` is what every ``evatok eval`` job returns (:mod:`evatok_cli.evaluation`). Its JSON holds
every field (docs/evaluation.md explains each one); :func:`render_markdown` is the table printed
and saved beside it. :func:`compare_reports` refuses two reports measured under different
protocols or with different metric weights (I3D / LPIPS sha256): their numbers are not comparable.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evatok_cli import __version__
from evatok_cli.config import load_json, save_json

REPORT_FORMAT = "evatok-eval-report-1"
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "fvd": False}


# ------------------------------------------------------------------------------------ report
@dataclass
class EvalReport:
    """Everything an evaluation measured and what it was measured with.

    Attributes:
        kind: ``recon``, ``gen`` or ``curve``.
        protocol: the protocol actually used (:meth:`Protocol.to_dict`, overrides applied).
        standard: True when the run followed a named protocol exactly with real weights.
        deviations: one line per departure from the protocol (empty when standard).
        test_only: seeded random I3D / LPIPS weights were used: the values mean nothing.
        summary: the headline numbers (flat name -> number): what ``compare`` puts side by side.
        models: ``tokenizer`` / ``router`` / ``gpt``: ``{path, sha256, preset}`` (or absent).
        metric_weights: ``i3d``: ``{variant, path, sha256, resolution}``; ``lpips``: ``{net,
            backbone, backbone_sha256, heads, heads_sha256}``; None when that metric was not run.
        data: ``inputs``, ``videos``, ``listing_sha256``, ``clips_available``, ``clips``, ``failures``.
        settings: the options of the run (assignment policy, metrics, batch size, cfg, ...).
        fvd: the FVD result (``FVDResult.to_dict()``) or None (for a curve: one per point).
        per_clip: recon: one record per clip (key, source, clip_start, assignment, tokens, metrics).
        points: curve: one record per point (label, kind, params, mean tokens, metrics, savings).
        samples: gen: per-sample records (index, class, tokens, block_lengths).
        seed: the protocol's seed (and, for gen, ``settings.sampler_seed``).
    """

    kind: str
    protocol: dict[str, Any]
    standard: bool
    deviations: list[str]
    test_only: bool
    summary: dict[str, Any]
    models: dict[str, Any]
    metric_weights: dict[str, Any]
    data: dict[str, Any]
    settings: dict[str, Any]
    seed: int
    fvd: dict[str, Any] | None = None
    per_clip: list[dict[str, Any]] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    evatok_version: str = __version__
    created_utc: str = ""
    wall_s: float = 0.0
    world_size: int = 1
    rank: int = 0
    format: str = REPORT_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalReport:
        if d.get("format") != REPORT_FORMAT:
            raise ValueError(f"not an evatok evaluation report (format {d.get('format')!r}, expected {REPORT_FORMAT})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown report fields: {', '.join(unknown)}")
        return cls(**d)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    return x


def load_report(path: str | Path) -> EvalReport:
    """Read a report JSON written by :func:`write_report`."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such report")
    try:
        return EvalReport.from_dict(load_json(p))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{p}: {e}") from None


def write_report(report: EvalReport, path: str | Path) -> tuple[Path, Path]:
    """Write ``path`` (JSON) and the same name with ``.md`` (markdown), atomically; returns both."""
    p = Path(path)
    md = p.with_suffix(".md") if p.suffix.lower() != ".md" else p.with_name(p.name + ".md")
    p.parent.mkdir(parents=True, exist_ok=True)
    save_json(p, report.to_dict())
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(render_markdown(report))
    tmp.replace(md)
    return p, md


# ------------------------------------------------------------------------------- comparison
class NotComparable(ValueError):
    """Two reports measured under different protocols or with different metric weights."""


def comparable(a: EvalReport, b: EvalReport) -> None:
    """Raise :class:`NotComparable` (one line) unless the two reports measure the same thing."""
    if a.kind != b.kind:
        raise NotComparable(f"not comparable: a {a.kind} report and a {b.kind} report")
    if a.protocol != b.protocol:
        diff = sorted(k for k in set(a.protocol) | set(b.protocol) if a.protocol.get(k) != b.protocol.get(k))
        raise NotComparable(
            f"not comparable: different protocols ({a.protocol.get('name')} vs "
            f"{b.protocol.get('name')}; differing fields: {', '.join(diff)})"
        )
    checked = (("i3d", ("variant", "sha256", "resolution")), ("lpips", ("net", "backbone_sha256", "heads_sha256")))
    for metric, fields in checked:
        wa, wb = (a.metric_weights or {}).get(metric), (b.metric_weights or {}).get(metric)
        if wa and wb:
            for f in fields:
                if wa.get(f) != wb.get(f):
                    raise NotComparable(
                        f"not comparable: different {metric.upper()} weights "
                        f"({f} {str(wa.get(f))[:16]} vs {str(wb.get(f))[:16]})"
                    )


def compare_reports(a: EvalReport, b: EvalReport, names: tuple[str, str] = ("A", "B")) -> str:
    """A markdown table putting two comparable reports side by side (raises :class:`NotComparable`)."""
    comparable(a, b)
    lines = [f"# evatok eval compare: {a.kind}, protocol {a.protocol.get('name')}", ""]
    for tag, r in zip(names, (a, b)):
        models = ", ".join(f"{k} {v['sha256'][:12]}" for k, v in r.models.items() if v)
        flag = "standard" if r.standard else "NON-STANDARD"
        lines.append(f"- **{tag}**: {models} ({flag}{', TEST ONLY' if r.test_only else ''}; {r.created_utc})")
    lines += ["", f"| | {names[0]} | {names[1]} | {names[1]} - {names[0]} |", "|---|---:|---:|---:|"]
    keys = list(dict.fromkeys([*a.summary, *b.summary]))
    for k in keys:
        va, vb = a.summary.get(k), b.summary.get(k)
        delta = vb - va if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else None
        lines.append(f"| {_label(k)} | {_fmt(k, va)} | {_fmt(k, vb)} | {_fmt(k, delta, signed=True)} |")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------- markdown
_LABELS = {
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "lpips": "LPIPS",
    "fvd": "FVD",
    "mean_tokens": "mean tokens",
    "uniform_tokens": "uniform tokens (max level)",
    "token_savings": "token savings vs uniform",
    "clips": "clips",
    "samples": "samples",
    "real_clips": "real clips",
    "cfg_scale": "CFG scale",
    "reference_tokens": "reference tokens (the paper's uniform baseline)",
    "savings_vs_reference": "token savings vs reference",
}


def _label(key: str) -> str:
    head, _, tail = key.rpartition("/")
    return f"{head}: {_LABELS.get(tail, tail)}" if head else _LABELS.get(key, key)


def _fmt(key: str, v: Any, signed: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    tail = key.rpartition("/")[2]
    sign = "+" if signed and v > 0 else ""
    if "savings" in tail:
        return f"{sign}{100 * v:.1f}%"
    if isinstance(v, int) and not signed:
        return str(v)
    if tail in ("lpips", "ssim"):
        return f"{sign}{v:.4f}"
    return f"{sign}{v:.2f}"


def render_markdown(report: EvalReport) -> str:
    """The human-readable report: what was measured, with what, and the numbers."""
    p = report.protocol
    flag = "standard" if report.standard else "NON-STANDARD"
    flag += ", TEST ONLY" if report.test_only else ""
    lines = [f"# evatok eval {report.kind}: protocol `{p.get('name')}` ({flag})", ""]
    where = p.get("split") if p.get("dataset") in ("any", p.get("split")) else f"{p.get('dataset')}, {p.get('split')}"
    lines.append(
        f"{p.get('frames')}x{p.get('height')}x{p.get('width')} clips at {p.get('fps')} fps from {where}; "
        f"clips per video: {p.get('clips_per_video')}; FVD variant {p.get('fvd_variant')}; "
        f"seed {report.seed}."
    )
    lines.append("")
    if report.kind == "curve":
        names = report.settings["metrics"]
        lines += [
            "| point | mean tokens | savings vs uniform | "
            + " | ".join(_LABELS.get(m, m) for m in names)
            + f" | savings at equal {names[0]} |",
            "|---|---:|---:|" + "---:|" * (len(names) + 1),
        ]
        for pt in report.points:
            lines.append(
                f"| {pt['label']} | {_fmt('t', pt['mean_tokens'])} | "
                f"{_fmt('token_savings', pt['token_savings'])} | "
                + " | ".join(_fmt(m, pt[m]) for m in names)
                + f" | {_fmt('savings', pt.get('savings_at_equal_quality'))} |"
            )
    else:
        lines += ["| metric | value |", "|---|---:|"]
        for k, v in report.summary.items():
            variant = (report.fvd or {}).get("variant", p.get("fvd_variant"))
            name = f"{'rFVD' if report.kind == 'recon' else 'gFVD'} ({variant})" if k == "fvd" else _label(k)
            lines.append(f"| {name} | {_fmt(k, v)} |")
    lines += ["", "## Weights", ""]
    for k, v in report.models.items():
        if v:
            preset = f" (preset {v['preset']})" if v.get("preset") else ""
            lines.append(f"- {k}: `{v['path']}` sha256 `{v['sha256']}`{preset}")
    i3d, lp = report.metric_weights.get("i3d"), report.metric_weights.get("lpips")
    if i3d:
        lines.append(f"- I3D ({i3d['variant']}, {i3d['resolution']}px): `{i3d['path']}` sha256 `{i3d['sha256']}`")
    if lp:
        lines.append(
            f"- LPIPS ({lp['net']}): backbone sha256 `{lp['backbone_sha256']}`, heads sha256 `{lp['heads_sha256']}`"
        )
    lines += [
        "",
        f"evatok {report.evatok_version}, {report.created_utc}, {report.world_size} process(es), "
        f"{report.wall_s:.1f}s; data listing sha256 `{report.data.get('listing_sha256', '')[:16]}`, "
        f"{report.data.get('clips')} of {report.data.get('clips_available')} clips.",
    ]
    if report.deviations:
        lines += ["", "## Deviations from the protocol", ""] + [f"- {d}" for d in report.deviations]
    return "\n".join(lines) + "\n"


def plot_curve(report: EvalReport, path: str | Path) -> Path:
    """Draw a curve report (one panel per metric: metric vs mean tokens) to a PNG.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'evatok[plot]'``).
    """
    if not matplotlib_available():
        raise ImportError("plotting needs matplotlib: pip install 'evatok[plot]' (or pip install matplotlib)")
    from matplotlib.figure import Figure  # no pyplot: no global state
    from matplotlib.ticker import ScalarFormatter

    names = report.settings["metrics"]
    fig = Figure(figsize=(5 * len(names), 4), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, m in zip(axes, names):
        for kind, style in (("uniform", "o-"), ("router", "s-"), ("threshold", "^--")):
            pts = [p for p in report.points if p["kind"] == kind and p[m] is not None and p["mean_tokens"] is not None]
            if pts:
                ax.plot([p["mean_tokens"] for p in pts], [p[m] for p in pts], style, label=kind)
                for p in pts:
                    ax.annotate(
                        p["label"].removeprefix("router-").removeprefix("uniform-"),
                        (p["mean_tokens"], p[m]),
                        fontsize=7,
                        textcoords="offset points",
                        xytext=(3, 3),
                    )
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("mean tokens per clip")
        ax.set_ylabel(m.upper() + (" (higher is better)" if HIGHER_IS_BETTER[m] else " (lower is better)"))
        ax.grid(True, alpha=0.3)
        ax.legend()
    title = f"evatok eval curve - protocol {report.protocol['name']}"
    fig.suptitle(title + ("" if report.standard else " (non-standard)"))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120)
    return p


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


__all__ = [
    "HIGHER_IS_BETTER",
    "REPORT_FORMAT",
    "EvalReport",
    "NotComparable",
    "comparable",
    "compare_reports",
    "load_report",
    "matplotlib_available",
    "plot_curve",
    "render_markdown",
    "write_report",
]
