"""The main job: encode a video dataset into a ragged token store (DESIGN §4, §6).

``encode_videos`` lists the inputs, splits them over torchrun ranks (video ``i`` goes to rank
``i % world_size``), decodes clips in DataLoader workers while the tokenizer runs, gives every clip
its assignment (fixed/uniform, from a labels store, from a router, or the fewest tokens that meet a
quality target), and appends the tokens to
this rank's part of the store. A rerun of the same command resumes: clips whose keys are already
committed are not decoded again; more inputs into a finished store are appended as new parts, and
with nothing new a finished store is left alone. Only one job writes a store at a time (the store
lock, ``evatok_cli.store.lock``). Bad inputs are skipped and recorded (``failures`` in the store
and in the summary); with ``strict`` the first one is fatal.

Tokens depend only on the clip and its assignment (the tokenizer is batch-invariant), so the
store holds the same keys and tokens whatever the batch size or the number of ranks.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader

from evatok_cli.assign import RouterPolicy, budget_assignments, parse_target, router_label, target_assignments
from evatok_cli.assignments import AssignmentSpace
from evatok_cli.checkpoint import open_model, store_attrs
from evatok_cli.metrics import get_metric
from evatok_cli.models.tokenizer import EVATokTokenizer
from evatok_cli.runtime import DistEnv, all_gather_objects, process_group
from evatok_cli.store import Sample, open_store, open_writer
from evatok_cli.store.lock import acquire as acquire_store_lock
from evatok_cli.video import (
    VIDEO_EXTENSIONS,
    ClipSpec,
    VideoRef,
    absolute_source,
    clip_key,
    list_inputs,
    parse_clip_policy,
)
from evatok_cli.video.dataset import ClipIndexDataset, collate_clips, to_model_input, worker_contiguous_order

log = logging.getLogger(__name__)

# Exit codes of `evatok encode` (docs/cli.md).
EXIT_OK, EXIT_SKIPPED = 0, 3


class EncodeError(Exception):
    """A fatal problem with the job as a whole (no inputs, strict mode, bad model): one line."""


@dataclass
class EncodeSummary:
    """What an encode run did (printed at the end; ``--json`` prints it as one object)."""

    out: str
    clips: int = 0  # clips encoded by this run
    skipped_done: int = 0  # clips already in the store from an earlier run (resume)
    failed_before: int = 0  # clips of inputs an earlier run recorded as failed (not retried; exit code 3)
    failures: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    tokens: int = 0
    mean_tokens: float = 0.0
    uniform_tokens: int = 0  # tokens per clip of the uniform assignment at the maximum level
    saved_fraction: float = 0.0  # 1 - mean_tokens / uniform_tokens
    wall_s: float = 0.0
    clips_per_s: float = 0.0
    tokens_per_s: float = 0.0
    padding_fraction: float = 0.0
    nothing_to_do: bool = False
    appended: bool = False  # the store was finished: this run's clips were added as new parts
    passed_over: int = 0  # files in the input directories whose extension is not a video's (not read)
    passed_over_examples: list[str] = field(default_factory=list)  # a few of them
    world_size: int = 1
    target: dict[str, Any] | None = None  # --target: metric, value, clips that met it, mean clip value

    @property
    def exit_code(self) -> int:
        return EXIT_SKIPPED if self.failures or self.failed_before else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Assigner(Protocol):
    """Gives each clip of a batch its assignment: (B, T) tokens per block."""

    def __call__(self, video: torch.Tensor, keys: Sequence[str]) -> torch.Tensor: ...


class FixedAssigner:
    """The same assignment for every clip (``uniform:K`` or ``fixed:k1,...,kT``)."""

    def __init__(self, assignment: tuple[int, ...]) -> None:
        self.assignment = torch.tensor(assignment, dtype=torch.long)

    def __call__(self, video: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        return self.assignment.expand(len(keys), -1).clone()


class TargetAssigner:
    """The fewest tokens whose reconstruction by the encoding tokenizer meets a quality target.

    ``evatok encode --target psnr=28``: :func:`evatok_cli.assign.target_assignments` (block by
    block, T x m block evaluations per clip); counts the clips that met the target.
    """

    def __init__(self, model: EVATokTokenizer, spec: str, metric_options: dict[str, Any] | None = None) -> None:
        self.name, self.value = parse_target(spec)
        if self.name == "lpips" and not (metric_options or {}).get("backbone"):
            raise EncodeError("--target lpips=... needs --lpips-backbone PATH (torchvision VGG16/AlexNet weights)")
        options = metric_options if self.name == "lpips" else {}
        self.model, self.metric = model, get_metric(self.name, **options)
        if isinstance(self.metric, torch.nn.Module):
            self.metric = self.metric.to(next(model.parameters()).device)
        self.clips = self.met = 0
        self.value_sum = 0.0

    def __call__(self, video: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        choice = target_assignments(self.model, video, self.metric, self.value)
        self.clips += len(keys)
        self.met += int(choice.met.sum())
        self.value_sum += float(choice.clip_values.sum())
        return choice.assignments

    def report(self) -> dict[str, Any]:
        return {
            "metric": self.name,
            "value": self.value,
            "clips": self.clips,
            "met": self.met,
            "value_sum": self.value_sum,
        }


class LabelsAssigner:
    """Assignments looked up by clip key in a labels store (``evatok search`` output)."""

    def __init__(self, path: Path, space: AssignmentSpace) -> None:
        store = open_store(path)
        if AssignmentSpace.from_dict(store.attrs["space"]) != space:
            raise EncodeError(f"{path}: its assignment space {store.attrs['space']} differs from the tokenizer's")
        self.path = path
        self.by_key = dict(zip(store.keys, (int(a) for a in store.assignments())))
        self.space = space

    def __call__(self, video: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        missing = [k for k in keys if k not in self.by_key]
        if missing:
            raise EncodeError(
                f"{self.path}: no assignment for clip {missing[0]} (was it searched with the same inputs and --clips?)"
            )
        return torch.tensor([self.space.to_tuple(self.by_key[k]) for k in keys], dtype=torch.long)


class RouterAssigner:
    """Assignments predicted by a router in one forward pass (PAPER §3.3)."""

    def __init__(
        self,
        path: Path | Sequence[Path],
        space: AssignmentSpace,
        clip: tuple[int, int, int],
        device: torch.device,
        w_q: float | None = None,
        w_l: float | None = None,
        prefix: Sequence[int] | None = None,
    ) -> None:
        try:
            self.policy = RouterPolicy.load(path, space, clip, device, w_q=w_q, w_l=w_l, prefix=prefix)
        except ValueError as e:
            raise EncodeError(str(e)) from None

    def __call__(self, video: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        return self.policy(video)


class TableAssigner:
    """Assignments looked up by clip key in a precomputed table (e.g. a budgeted routing pass)."""

    def __init__(self, table: dict[str, tuple[int, ...]], what: str) -> None:
        self.table, self.what = table, what

    def __call__(self, video: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        missing = [k for k in keys if k not in self.table]
        if missing:
            raise EncodeError(f"{self.what}: no assignment for clip {missing[0]}")
        return torch.tensor([self.table[k] for k in keys], dtype=torch.long)


def read_labels(refs: Sequence[VideoRef], label_from: str | None) -> tuple[list[int], list[str] | None]:
    """Class id per video and the id -> name list, from the parent folder name or a CSV ``path,label``."""
    if label_from is None:
        return [-1] * len(refs), None
    if label_from == "parent-dir":
        names = sorted({r.label_hint for r in refs})
        ids = {n: i for i, n in enumerate(names)}
        return [ids[r.label_hint] for r in refs], names
    path = Path(label_from)
    if not path.is_file():
        raise EncodeError(f"{path}: --label-from must be 'parent-dir' or an existing CSV file (path,label)")
    rows: dict[str, str] = {}
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or row[0].startswith("#") or (n == 1 and row[0].strip().lower() == "path"):
                continue
            if len(row) < 2:
                raise EncodeError(f"{path}:{n}: expected 'path,label', got {','.join(row)!r}")
            rows[row[0].strip()] = row[1].strip()
    names = sorted(set(rows.values()))
    ids = {n: i for i, n in enumerate(names)}

    def lookup(r: VideoRef) -> int:
        for cand in (
            r.source,
            str(Path(r.source).resolve()) if "::" not in r.source else r.source,
            Path(r.source).name,
        ):
            if cand in rows:
                return ids[rows[cand]]
        return -1

    return [lookup(r) for r in refs], names


GROUP_WINDOW = 4  # loader batches pooled before grouping clips of similar length


def _windows(loader, n: int):
    """Pool ``n`` consecutive (batch, failures) pairs of ``collate_clips`` into one."""
    pending: list[tuple[dict, list]] = []

    def merged() -> tuple[dict, list]:
        goods = [b for b, _ in pending if b["key"]]
        batch = {
            "video": torch.cat([b["video"] for b in goods]) if goods else None,
            "key": [k for b in goods for k in b["key"]],
            "source": [x for b in goods for x in b["source"]],
            "clip_start": [int(x) for b in goods for x in b["clip_start"]],
        }
        return batch, [f for _, fs in pending for f in fs]

    for item in loader:
        pending.append(item)
        if len(pending) == n:
            yield merged()
            pending = []
    if pending:
        yield merged()


def _grouped(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Split positions into batches of similar total length (less padding); order within is kept."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def encode_videos(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    tokenizer: str | Path,
    format: str = "zarr",
    assignment: str | None = None,
    labels_store: str | Path | None = None,
    router: str | Path | Sequence[str | Path] | None = None,
    w_q: float | None = None,
    w_l: float | None = None,
    budget: float | None = None,
    router_prefix: str | Sequence[int] | None = None,
    target: str | None = None,
    metric_options: dict[str, Any] | None = None,
    assigner: Assigner | None = None,
    clips: str | int = "all",
    fps: str | float = "native",
    label_from: str | None = None,
    batch_size: int = 8,
    workers: int = 2,
    device: str = "auto",
    seed: int = 0,
    strict: bool = False,
    stdin=None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    extensions: Sequence[str] | None = None,
) -> EncodeSummary:
    """Encode every clip of ``inputs`` into the token store ``out``; see the module docstring.

    Args:
        inputs: video files, directories, ``-`` (paths on ``stdin``) or WebDataset tars of videos.
        out: the store to write (``.zarr`` directory or WebDataset shard directory).
        tokenizer: a tokenizer model directory (or a training output directory: its latest step).
        assignment: ``uniform:K`` or ``fixed:k1,...,kT``; or give ``labels_store``, ``router`` or ``assigner``.
        router: a router model directory (several: an ensemble of reward-head routers,
            :func:`evatok_cli.assign.open_router`): each clip's assignment is the argmax of the router's
            scores with ``w_q``/``w_l`` (reward head; default: the router's training weights), or,
            with ``budget`` (mean tokens per clip over this job's clips; reward head only), the
            Lagrangian budget solution. Budget mode routes every clip first (a second decoding pass).
        router_prefix: ``k1,...,kP``: only the router's assignments that start with these block
            lengths (the best-scoring one per clip): training data for ``evatok train gpt
            --prefix-blocks P`` (PAPER §6: the most probable assignment starting with (512, 128)).
        target: ``psnr=28``, ``ssim=0.9`` or ``lpips=0.15``: each clip gets the fewest tokens whose
            reconstruction by ``tokenizer`` meets it, block by block (:class:`TargetAssigner`);
            ``metric_options`` (LPIPS: ``net``, ``backbone``, ``heads``) go to ``get_metric``.
        clips: clip policy per video: ``all``, ``first``, ``N`` (evenly spaced) or ``random``.
        label_from: ``parent-dir`` (UCF-101 layout) or a CSV file ``path,label``.
        on_progress: called after every batch with running totals (rank 0 only).
        extensions: file endings kept when walking directories (default: ``VIDEO_EXTENSIONS``);
            the files a walk passes over are counted in the summary.

    Returns:
        The :class:`EncodeSummary` of this rank's work (rank 0's summary covers all ranks' clips
        when the job is distributed: counts are summed over ranks).
    """
    t0 = time.perf_counter()
    if batch_size < 1:
        raise EncodeError(f"--batch-size must be >= 1, got {batch_size}")
    if sum(x is not None for x in (assignment, labels_store, router, target, assigner)) > 1:
        raise EncodeError("give only one of --assignment, --labels-store, --router and --target")
    if target is not None:
        try:
            parse_target(target)
        except ValueError as e:
            raise EncodeError(str(e)) from None
    if budget is not None and router is None:
        raise EncodeError("--budget needs --router (a reward-head router)")
    if router_prefix is not None and (router is None or budget is not None):
        raise EncodeError("--router-prefix needs --router (and no --budget)")
    # one writer per store: a second job on the same store is refused before any work
    with process_group(device) as env, acquire_store_lock(out, rank=env.rank):
        tok = open_model(tokenizer, "tokenizer", device=env.device)
        model, space, cfg = tok.model, tok.model.space, tok.model.config
        spec, policy = (
            ClipSpec(frames=cfg.frames, height=cfg.height, width=cfg.width, fps=fps),
            parse_clip_policy(clips),
        )
        passed_over: list[str] = []
        refs = list_inputs(
            [str(i) for i in inputs], extensions=extensions or VIDEO_EXTENSIONS, stdin=stdin, passed_over=passed_over
        )
        if not refs:
            extra_msg = (
                f" ({len(passed_over)} files passed over, e.g. {passed_over[0]}; see --extensions)"
                if passed_over
                else ""
            )
            raise EncodeError(f"no video inputs found in {', '.join(map(str, inputs))}{extra_msg}")
        prefix = _router_prefix(router_prefix, space)
        policy_name = _policy_name(assignment, labels_store, router, budget, assigner, space)
        if prefix is not None:
            policy_name["prefix"] = list(prefix)
        if target is not None:
            assigner = TargetAssigner(model, target, metric_options)
            policy_name = {"target": target}
        if assigner is None:
            assigner = _assigner(space, spec, env, assignment=assignment, labels_store=labels_store, router=router,
                                 w_q=w_q, w_l=w_l, budget=budget, refs=refs, policy=policy, seed=seed,
                                 batch_size=batch_size, workers=workers, prefix=prefix)  # fmt: skip
        labels, names = read_labels(refs, label_from)
        extra = {"kind": "encode", "clip_policy": str(clips), "seed": seed, "assignment_policy": policy_name}
        if names is not None:
            extra["labels"] = names
        writer = open_writer(out, format=format, attrs=store_attrs(tok, spec, extra), num_blocks=space.blocks,
                             rank=env.rank, world_size=env.world_size, barrier=env.barrier,
                             commit_every=4 * batch_size)  # fmt: skip
        summary = EncodeSummary(
            out=str(out),
            uniform_tokens=space.levels[-1] * space.blocks,
            world_size=env.world_size,
            passed_over=len(passed_over),
            passed_over_examples=passed_over[:5],
        )
        if passed_over:
            log.info(
                "passed over %d files that are not videos by their extension (e.g. %s)",
                len(passed_over),
                passed_over[0],
            )
        try:
            mine = list(range(env.rank, len(refs), env.world_size))
            dataset = ClipIndexDataset([refs[i] for i in mine], spec, policy, seed)
            label_of = {refs[i].source: labels[i] for i in mine}
            todo = _todo(dataset, writer, summary)
            if writer.finished:
                # More inputs into a finished store append as new parts (DESIGN §4); all ranks decide together.
                if not any(all_gather_objects(bool(todo), env)):
                    writer.close()
                    summary.nothing_to_do = True
                    log.info(
                        "%s is already finished with all %d clips of these inputs; nothing to do",
                        out,
                        summary.skipped_done,
                    )
                    return _finish(summary, env, t0)
                writer.start_append()
                summary.appended = True
        except BaseException:
            writer.abort()
            raise
        if summary.skipped_done:
            log.info(
                "%s: %d clips already in the store",
                "appending" if summary.appended else "resuming",
                summary.skipped_done,
            )
        # each worker reads one contiguous stretch of the clips, so a video is decoded about once
        order = [todo[i] for i in worker_contiguous_order(len(todo), batch_size, workers)]
        loader = DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=workers,
                            collate_fn=collate_clips, prefetch_factor=4 if workers > 0 else None)  # fmt: skip
        padding = [0, 0]  # padded tokens, tokens run
        try:
            for batch, failures in _windows(loader, GROUP_WINDOW):
                _record_failures(failures, writer, summary, strict)
                if not batch["key"]:
                    if on_progress is not None and env.is_main:  # failed clips count as processed
                        on_progress(_progress(summary, len(todo), time.perf_counter() - t0))
                    continue
                video = to_model_input(batch["video"]).to(env.device)
                samples = _encode_batch(model, video, assigner(video, batch["key"]).to(env.device), batch,
                                        label_of, batch_size, padding)  # fmt: skip
                writer.append(samples)  # decode order, whatever the grouping
                summary.clips += len(samples)
                summary.tokens += sum(sum(s.block_lengths) for s in samples)
                if on_progress is not None and env.is_main:
                    on_progress(_progress(summary, len(todo), time.perf_counter() - t0))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        summary.padding_fraction = padding[0] / padding[1] if padding[1] else 0.0
        if isinstance(assigner, TargetAssigner):
            summary.target = assigner.report()
        return _finish(summary, env, t0)


def _todo(dataset: ClipIndexDataset, writer: Any, summary: EncodeSummary) -> list[int]:
    """Positions of this rank's clips still to encode (resume: committed clips and failed sources are skipped)."""
    todo, already_failed = [], set(writer.failed_sources)
    for j, (v, start, err) in enumerate(dataset.index):
        ref = dataset.refs[v]
        if err is None and clip_key(ref.source, start) in writer.done_keys:
            summary.skipped_done += 1
        elif ref.source in already_failed:  # failed in an earlier run: recorded once, not retried
            summary.failed_before += 1
        else:
            todo.append(j)
    return todo


def _record_failures(failures: list[dict[str, str]], writer: Any, summary: EncodeSummary, strict: bool) -> None:
    for f in failures:
        if strict:
            raise EncodeError(f"{f['source']}: {f['error']}")
        writer.add_failure(f["source"], f["error"])
        summary.failures += 1
        summary.failed.append({"source": f["source"], "reason": f["error"]})


def _encode_batch(
    model: EVATokTokenizer,
    video: torch.Tensor,
    assignments: torch.Tensor,
    batch: dict[str, Any],
    label_of: dict[str, int],
    batch_size: int,
    padding: list[int],
) -> list[Sample]:
    """Tokens of a pooled batch, encoded in groups of similar length; samples in the batch's order."""
    space, lengths = model.space, assignments.sum(1).tolist()
    samples: list[Sample | None] = [None] * len(lengths)
    for group in _grouped(lengths, batch_size):
        idx = torch.tensor(group, device=video.device)
        tokens, block_lengths = model.encode(video.index_select(0, idx), assignments.index_select(0, idx))
        longest = max(lengths[g] for g in group)
        padding[0] += longest * len(group) - sum(lengths[g] for g in group)
        padding[1] += longest * len(group)
        for g, tok, bl in zip(group, tokens, block_lengths.tolist()):
            samples[g] = Sample(
                key=batch["key"][g],
                tokens=tok.cpu().numpy(),
                block_lengths=tuple(bl),
                assignment=space.to_index(bl),
                source=batch["source"][g],
                clip_start=int(batch["clip_start"][g]),
                label=label_of.get(batch["source"][g], -1),
                source_path=absolute_source(batch["source"][g]),
            )
    return [s for s in samples if s is not None]


def _progress(summary: EncodeSummary, total: int, elapsed: float) -> dict[str, Any]:
    return {
        "clips": summary.clips,
        "done": summary.clips + summary.failures,
        "total": total,
        "failures": summary.failures,
        "tokens": summary.tokens,
        "clips_per_s": summary.clips / elapsed,
        "tokens_per_s": summary.tokens / elapsed,
        "mean_tokens": summary.tokens / max(1, summary.clips),
    }


def _finish(summary: EncodeSummary, env: DistEnv, t0: float) -> EncodeSummary:
    """Sum the counts over ranks (rank 0 reports the whole job), then the rates."""
    parts = all_gather_objects(
        (
            summary.clips,
            summary.failures,
            summary.tokens,
            summary.skipped_done,
            summary.failed_before,
            summary.failed,
            summary.target,
        ),
        env,
    )
    summary.clips, summary.failures, summary.tokens, summary.skipped_done, summary.failed_before = (
        sum(p[i] for p in parts) for i in range(5)
    )
    summary.failed = [f for p in parts for f in p[5]]
    if summary.target is not None:  # clips that met the target, summed over ranks
        t = dict(summary.target)
        for k in ("clips", "met", "value_sum"):
            t[k] = sum(p[6][k] for p in parts if p[6])
        t["mean_value"] = t.pop("value_sum") / t["clips"] if t["clips"] else None
        t["met_fraction"] = t["met"] / t["clips"] if t["clips"] else None
        summary.target = t
    summary.mean_tokens = summary.tokens / summary.clips if summary.clips else 0.0
    summary.saved_fraction = 1.0 - summary.mean_tokens / summary.uniform_tokens if summary.clips else 0.0
    summary.wall_s = time.perf_counter() - t0
    summary.clips_per_s = summary.clips / summary.wall_s
    summary.tokens_per_s = summary.tokens / summary.wall_s
    if summary.clips == 0 and summary.skipped_done == 0 and summary.failures:
        raise EncodeError(
            f"no valid input: all {summary.failures} inputs failed (first: {summary.failed[0]['source']}: "
            f"{summary.failed[0]['reason']})"
        )
    return summary


def _router_prefix(spec: str | Sequence[int] | None, space: AssignmentSpace) -> tuple[int, ...] | None:
    """``--router-prefix k1,...,kP`` as block lengths (levels of the space, 1 <= P <= T)."""
    if spec is None:
        return None
    try:
        values = [int(v) for v in spec.split(",") if v.strip()] if isinstance(spec, str) else [int(v) for v in spec]
    except ValueError:
        raise EncodeError(f"--router-prefix must be k1,...,kP, got {spec!r}") from None
    if not 1 <= len(values) <= space.blocks or any(k not in space.levels for k in values):
        raise EncodeError(f"--router-prefix {values} must be 1 to {space.blocks} levels of {list(space.levels)}")
    return tuple(values)


def _assigner(space: AssignmentSpace, spec: ClipSpec, env: DistEnv, *, assignment, labels_store, router, w_q, w_l,
              budget, refs, policy, seed, batch_size, workers, prefix=None) -> Assigner:  # fmt: skip
    if router is not None:
        clip = (spec.frames, spec.height, spec.width)
        assigner = RouterAssigner(router, space, clip, env.device, w_q, w_l, prefix=prefix)
        if budget is None:
            return assigner
        return _budget_table(assigner.policy, refs, spec, policy, seed, budget, env, batch_size, workers)
    if labels_store is not None:
        return LabelsAssigner(Path(labels_store), space)
    return FixedAssigner(space.parse(assignment or f"uniform:{space.levels[-1]}"))


def _policy_name(assignment, labels_store, router, budget, assigner, space: AssignmentSpace) -> dict[str, Any]:
    if router is not None:
        d: dict[str, Any] = {"router": router_label(router)}
        if budget is not None:
            d["budget"] = budget
        return d
    if labels_store is not None:
        return {"labels_store": str(labels_store)}
    if assigner is not None:
        return {"custom": type(assigner).__name__}
    return {"fixed": list(space.parse(assignment or f"uniform:{space.levels[-1]}"))}


def _budget_table(
    router: RouterPolicy,
    refs: Sequence[VideoRef],
    spec: ClipSpec,
    policy: Any,
    seed: int,
    budget: float,
    env: DistEnv,
    batch_size: int,
    workers: int,
) -> TableAssigner:
    """Budget mode: route every clip of the job first, then solve the budget over all of them."""
    if env.distributed:
        raise EncodeError("--budget runs in one process (the budget is shared by all clips); run it without torchrun")
    head = router.model.config.head
    if head != "reward":
        raise EncodeError(f"--budget needs a reward-head router; {router.source.dir} has a {head!r} head")
    loader = DataLoader(ClipIndexDataset(list(refs), spec, policy, seed), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_clips)  # fmt: skip
    keys, preds = [], [np.zeros((0, len(router.space)), dtype=np.float32)]
    with torch.no_grad():
        for batch, _ in loader:
            if batch["key"]:
                video = to_model_input(batch["video"]).to(env.device)
                preds.append(router.model.predict(video).float().cpu().numpy())
                keys += batch["key"]
    idx, _ = budget_assignments(np.concatenate(preds), router.space, budget)
    table = router.space.table()
    log.info("budget %.1f: routed %d clips, mean %.1f tokens", budget, len(keys), float(table[idx].sum(1).mean()))
    return TableAssigner(
        {k: tuple(int(x) for x in table[i]) for k, i in zip(keys, idx)}, f"budget routing of {router.source.dir}"
    )
