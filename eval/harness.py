"""The few-shot evaluation loop (the Flamingo / OpenFlamingo protocol), over any task object.

For every task x shot count x trial: choose demonstrations from the train split for each test
sample (seeded random draws, or RICES), let the task build each prompt, run the model in batches
through the task (it decides how: generation settings or log-likelihood ranking), then let the task
score the trial with its metrics. The loop names no task: the interface is `lmm.eval.task.EvalTask`,
and names are looked up in `lmm.eval.registry` (a task object can be passed instead of a name).

- Random demos: a sample's demos are drawn with a RNG seeded by (trial seed, task, sample id), so
  they do not depend on batching or sharding; `trials` trials use seeds seed, seed+1, ...; the
  mean and (population) std over trials are reported.
- RICES demos are deterministic: one trial.
- Zero-shot: `zero_shot_text_demos` (default 2) demonstrations are still drawn but shown without
  their images (OpenFlamingo's trick), for the tasks that use it; 0 turns it off. Chat tasks use none.
- `prompt_style`: "flamingo" (the completion templates of `lmm.eval.prompts`) or "chat" (each benchmark query,
  and its demos as earlier turns, rendered by `model.render_chat`, as `model.chat` asks; no text-only demos).
  Chat tasks always use their chat format.
- `blind`: also each task's blind baseline (the same model asked without media), where it has one.
- Every number reported is x100 (CIDEr 1.05 -> 105.0; accuracy 0.5 -> 50.0), as in the papers.

The model needs what its tasks use (`generate`, `score`, `render_chat`; see `lmm.model.LMM`) and
`embed_images(images)` for RICES.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import prompts
from .registry import parse_tasks
from .results import ShardStore, aggregate_trials, summary_table, write_json
from .rices import RICES, FeatureCache, embed_paths
from .task import EvalConfigError, EvalTask, Sample, TaskData, TaskDataError, load_image

SHOTS = (0, 4, 8, 16, 32)


@dataclass
class EvalConfig:
    tasks: list  # task names (lmm.eval.registry) and/or EvalTask objects
    shots: list[int] = field(default_factory=lambda: list(SHOTS))
    data_root: str | None = None
    limit: int | None = None  # evaluate the first N test samples (chat tasks: of their seeded shuffle)
    trials: int = 3  # random-demo trials (seeds seed .. seed + trials - 1)
    seed: int = 0
    rices: bool = False
    batch_size: int = 8
    out: str | None = None  # aggregate JSON; None writes nothing and resumes nothing
    zero_shot_text_demos: int = prompts.ZERO_SHOT_TEXT_DEMOS
    num_beams: int = 3  # OpenFlamingo generates with 3 beams
    max_new_tokens: int | None = None  # None: each task's own default (prompts.GENERATION, chat: 8)
    shard_size: int = 64
    rices_cache: str | None = None  # RICES feature cache folder (default: <out>.shards/rices; none without out)
    meteor: bool = True
    progress: bool = True
    blind: bool = False  # also each task's blind baseline (same model, no media), where it has one
    prompt_style: str = "flamingo"  # benchmarks: "flamingo" completion templates or "chat" (model.render_chat)

    def validate(self) -> None:
        if not self.tasks:
            raise EvalConfigError(
                "no tasks given: pass --tasks NAME[,NAME...] (the names: `python -m pydoc "
                "lmm.eval.registry`) or --data FILE"
            )
        if not self.shots or any((not isinstance(s, int)) or s < 0 for s in self.shots):
            raise EvalConfigError(f"--shots must be non-negative integers, got {self.shots}")
        for name, v in (
            ("--trials", self.trials),
            ("--batch-size", self.batch_size),
            ("shard_size", self.shard_size),
            ("--num-beams", self.num_beams),
        ):
            if v < 1:
                raise EvalConfigError(f"{name} must be at least 1, got {v}")
        if self.limit is not None and self.limit < 1:
            raise EvalConfigError(f"--limit must be at least 1, got {self.limit}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise EvalConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.zero_shot_text_demos < 0:
            raise EvalConfigError("zero_shot_text_demos must be >= 0")
        if self.prompt_style not in prompts.PROMPT_STYLES:
            raise EvalConfigError(
                f"--prompt-style must be one of {', '.join(prompts.PROMPT_STYLES)}, got {self.prompt_style!r}"
            )
        needs_root = [t.name for t in parse_tasks(self.tasks) if t.needs_data_root]
        if needs_root and self.data_root is None:
            raise EvalConfigError(
                f"pass --data-root PATH: the files of {', '.join(needs_root)} are read from it "
                f"(layout: `python -m pydoc lmm.eval.tasks`)"
            )
        if needs_root and not Path(self.data_root).is_dir():
            raise EvalConfigError(f"--data-root {self.data_root} is not a folder")


def work_paths(out: str | Path) -> tuple[Path, Path]:
    """(shards folder, predictions folder) beside the aggregate JSON:
    results.json -> results.shards/, results.predictions/."""
    out = Path(out)
    return out.with_name(out.stem + ".shards"), out.with_name(out.stem + ".predictions")


def random_demo_indices(pool_size: int, k: int, seed: int, task: str, sample_id: str) -> list[int]:
    """`k` distinct train indices for one test sample; the same for the same (seed, task, sample)."""
    if k > pool_size:
        raise EvalConfigError(
            f"{task}: {k} demonstrations asked but the train split has {pool_size} samples; lower --shots"
        )
    return random.Random(f"{seed}|{task}|{sample_id}").sample(range(pool_size), k)


# ------------------------------------------------------------------ model calls


def _infer_batch(
    model,
    task: EvalTask,
    data: TaskData,
    batch: list[Sample],
    demos: list[list[Sample]],
    text_only: bool,
    cfg: EvalConfig,
) -> list[dict]:
    built = [task.build_inputs(model, s, d, text_only) for s, d in zip(batch, demos)]
    texts = [p for p, _ in built]
    images = [[load_image(x) if isinstance(x, str) else x for x in paths] for _, paths in built]
    base = [{"id": s.id, "demos": [d.id for d in ds]} for s, ds in zip(batch, demos)]
    with torch.no_grad():
        outs = task.infer(model, texts, images, data, cfg)
    if len(outs) != len(batch):
        raise RuntimeError(f"{task.name}: {len(outs)} records for {len(batch)} samples")
    return [dict(r, **o) for r, o in zip(base, outs)]


# ------------------------------------------------------------------ the run


def _check_model(model, task_list: list[EvalTask], cfg: EvalConfig) -> None:
    need = {m for t in task_list for m in t.model_methods}
    if cfg.rices:
        need.add("embed_images")
    missing = sorted(n for n in need if not callable(getattr(model, n, None)))
    if missing:
        raise EvalConfigError(
            f"the model lacks {', '.join(missing)}(): evaluate an lmm.model.LMM (or an object with the same methods)"
        )


def _rices_demos(
    model,
    task: EvalTask,
    data: TaskData,
    test: list[Sample],
    k: int,
    cfg: EvalConfig,
    shard_root: Path | None,
    model_id: str,
) -> list[list[int]]:
    """Per test sample, the train indices of its `k` RICES demos (closest last).

    Retrieval runs over the distinct train images (VQA datasets ask several questions per image);
    an image stands for its first train sample, so the demos always show `k` different images.
    Features are cached under `<out>.shards/rices/` (or `cfg.rices_cache`)."""
    first_sample: dict[str, int] = {}
    for i, s in enumerate(data.train):
        first_sample.setdefault(s.image, i)
    train_images = list(first_sample)
    if k > len(train_images):
        raise EvalConfigError(
            f"{task.name}: {k} demonstrations asked but the train split has {len(train_images)} "
            f"distinct images; lower --shots"
        )
    cache_dir = cfg.rices_cache or (shard_root / "rices" if shard_root is not None else None)
    cache = FeatureCache(cache_dir, model_id) if cache_dir is not None else None
    bs = cfg.batch_size * 4
    finder = RICES.from_paths(model.embed_images, train_images, cache, f"{task.name}-train", bs, cfg.progress)
    test_images = list(dict.fromkeys(s.image for s in test))
    if cache is not None:
        q = cache.get(f"{task.name}-test", test_images, model.embed_images, bs, cfg.progress)
    else:
        q = embed_paths(model.embed_images, test_images, bs, cfg.progress)
    rows = dict(zip(test_images, finder.find(q, k)))
    return [[first_sample[train_images[j]] for j in rows[s.image]] for s in test]


def default_model_id(model) -> str:
    """A name for the model in results and resume fingerprints: its name plus a hash of its config
    and trainable weights, so that another model never reuses this one's finished shards."""
    import hashlib
    import json

    cfg = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(cfg, "name", None) or type(model).__name__
    h = hashlib.sha256()
    if hasattr(cfg, "to_dict"):
        h.update(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    state = getattr(model, "trainable_state_dict", None)
    if not callable(state):
        return str(name)
    for key, tensor in sorted(state().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return f"{name}@{h.hexdigest()[:12]}"


def _file_stamp(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        return path
    st = p.stat()
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def evaluate(model, cfg: EvalConfig, model_id: str | None = None) -> dict:
    """Run every task x shots x trial of `cfg`; return (and write to cfg.out) the results dict.

    `model_id` names the model in the results and in the resume fingerprints (default:
    `default_model_id(model)`): with `cfg.out` set, shards finished by an earlier run with the same
    model_id and settings are loaded, not recomputed.
    """
    cfg.validate()
    task_list = [t.with_prompt_style(cfg.prompt_style) for t in parse_tasks(cfg.tasks)]
    _check_model(model, task_list, cfg)
    no_rices = [t.name for t in task_list if cfg.rices and not t.supports_rices]
    if no_rices:
        raise EvalConfigError(f"--rices retrieves demos by image features; {', '.join(no_rices)} cannot: drop --rices")
    for t in task_list:
        t.check()  # e.g. Java for caption metrics: fail before hours of generation, not after
    model_id = model_id or default_model_id(model)
    shard_root, pred_root = work_paths(cfg.out) if cfg.out is not None else (None, None)
    if hasattr(model, "eval"):
        model.eval()

    results: dict = {}
    notes: dict = {}
    files: dict = {}
    subsets: dict = {}
    for task in task_list:
        data = task.load(cfg.data_root, cfg.seed)
        files[task.name] = data.files
        test = data.test[: cfg.limit] if cfg.limit else list(data.test)
        if not test:
            raise TaskDataError(f"{task.name}: the test split is empty")
        subsets[task.name] = task.describe_subset(len(test), len(data.test), cfg.limit, cfg.seed)
        demo_counts = {s: (s if s > 0 else task.zero_shot_demos(cfg.zero_shot_text_demos)) for s in cfg.shots}
        if max(demo_counts.values()) > len(data.train):  # say so before any work on this task
            raise EvalConfigError(
                f"{task.name}: {max(demo_counts.values())} demonstrations asked but the train split "
                f"has {len(data.train)} samples; lower --shots"
            )
        rices_order = None
        if cfg.rices and max(demo_counts.values()) > 0:
            rices_order = _rices_demos(model, task, data, test, max(demo_counts.values()), cfg, shard_root, model_id)
        results[task.name] = {}
        for shots in cfg.shots:
            n_demos = demo_counts[shots]
            selection = "rices" if (cfg.rices and n_demos > 0) else "random"
            n_trials = 1 if (n_demos == 0 or selection == "rices") else cfg.trials
            trials = []
            for t in range(n_trials):
                trial, trial_notes = _run_trial(
                    model,
                    task,
                    data,
                    test,
                    shots,
                    n_demos,
                    selection,
                    cfg.seed + t,
                    rices_order,
                    cfg,
                    model_id,
                    shard_root,
                    pred_root,
                    desc=f"{task.name} {shots}-shot" + (f" trial {t + 1}/{n_trials}" if n_trials > 1 else ""),
                )
                trials.append(trial)
                for n in trial_notes:
                    if n not in notes.setdefault(task.name, []):
                        notes[task.name].append(n)
            mean, std = aggregate_trials(trials)
            results[task.name][str(shots)] = {
                "primary_metric": task.primary_metric,
                "mean": mean,
                "std": std,
                "n": len(test),
                "demo_selection": selection,
                "n_demos": n_demos,
                "text_only_demos": shots == 0 and n_demos > 0,
                "trials": trials,
            }
        if cfg.blind:  # shot-independent: no media, no demos
            with torch.no_grad():
                blind = task.blind_baseline(model, test, data, cfg)
            if blind is None:
                notes.setdefault(task.name, []).append("no blind baseline for this task")
            for r in results[task.name].values():
                r["blind"] = blind
    cfg_dict = asdict(replace(cfg, tasks=[t.name for t in task_list]))
    cfg_dict.pop("progress", None)
    report = {
        "model": model_id,
        "config": cfg_dict,
        "results": results,
        "notes": notes,
        "data_files": files,
        "subsets": subsets,
        "scale": "all metrics x100 (CIDEr as in the COCO tables; accuracies and ROC-AUC in %)",
    }
    if cfg.out is not None:
        write_json(Path(cfg.out), report)
    return report


def _run_trial(
    model,
    task: EvalTask,
    data: TaskData,
    test: list[Sample],
    shots: int,
    n_demos: int,
    selection: str,
    seed: int,
    rices_order,
    cfg: EvalConfig,
    model_id: str,
    shard_root,
    pred_root,
    desc: str,
):
    """One task x shots x trial: choose demos, run (or reload) the shards, score. Returns (trial, notes)."""
    if selection == "rices":

        def demo_fn(i, sample):
            return [data.train[j] for j in rices_order[i][-n_demos:]]
    else:

        def demo_fn(i, sample):
            return [data.train[j] for j in random_demo_indices(len(data.train), n_demos, seed, task.name, sample.id)]

    spec = {
        "model": model_id,
        "task": task.name,
        "shots": shots,
        "n_demos": n_demos,
        "selection": selection,
        "seed": seed if selection == "random" else None,
        "files": [_file_stamp(f) for f in data.files],
        "shard_size": cfg.shard_size,
        "task_settings": task.fingerprint(cfg),
    }
    store = ShardStore(shard_root, f"{task.name}/{shots}shot-{selection}-seed{seed}", spec)
    records = run_unit(model, task, data, test, demo_fn, text_only=(shots == 0), cfg=cfg, store=store, desc=desc)
    scores, notes, records = task.score(data, test, records, cfg)
    trial = {"seed": seed if selection == "random" else None, "metrics": scores, "n": len(test)}
    if pred_root is not None:
        pred_file = pred_root / f"{task.name}_{shots}shot_{selection}_seed{seed}.json"
        write_json(pred_file, records)
        trial["predictions_file"] = str(pred_file)
    else:
        trial["predictions"] = records
    return trial, notes


def run_unit(
    model,
    task: EvalTask,
    data: TaskData,
    test: list[Sample],
    demo_fn,
    text_only: bool,
    cfg: EvalConfig,
    store: ShardStore,
    desc: str = "",
) -> list[dict]:
    """Per-sample records for one task x shots x trial, shard by shard, skipping finished shards."""
    from tqdm.auto import tqdm

    records: list[dict] = []
    bar = tqdm(total=len(test), desc=desc, unit="sample", disable=not cfg.progress)
    try:
        for index, start in enumerate(range(0, len(test), cfg.shard_size)):
            chunk = test[start : start + cfg.shard_size]
            ids = [s.id for s in chunk]
            done = store.load(index, ids)
            if done is None:
                done = []
                for b in range(0, len(chunk), cfg.batch_size):
                    batch = chunk[b : b + cfg.batch_size]
                    demos = [demo_fn(start + b + i, s) for i, s in enumerate(batch)]
                    done += _infer_batch(model, task, data, batch, demos, text_only, cfg)
                    bar.update(len(batch))
                store.save(index, ids, done)
            else:
                bar.update(len(chunk))
            records += done
    finally:
        bar.close()
    return records


def evaluate_task(
    model,
    task,
    shots: int = 0,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    blind: bool = False,
    max_new_tokens: int | None = None,
    data_root: str | None = None,
    progress: bool = False,
    model_id: str | None = None,
    prompt_style: str = "flamingo",
) -> dict:
    """One task (a name or an EvalTask) at one shot count, one trial, nothing written: {"task", "shots",
    "primary_metric", "metrics" (x100), "n", "subset": how the test samples were chosen, "predictions",
    "blind": the blind baseline's metrics or None}. `lmm eval` reports the same numbers for the same settings."""
    cfg = EvalConfig(
        tasks=[task],
        shots=[shots],
        data_root=data_root,
        limit=limit,
        seed=seed,
        batch_size=batch_size,
        trials=1,
        out=None,
        progress=progress,
        max_new_tokens=max_new_tokens,
        blind=blind,
        prompt_style=prompt_style,
    )
    report = evaluate(model, cfg, model_id=model_id)
    ((name, by_shots),) = report["results"].items()
    r = by_shots[str(shots)]
    trial = r["trials"][0]
    return {
        "task": name,
        "shots": shots,
        "primary_metric": r["primary_metric"],
        "metrics": trial["metrics"],
        "n": trial["n"],
        "subset": report["subsets"][name],
        "predictions": trial["predictions"],
        "blind": r.get("blind"),
    }


def print_summary(report: dict) -> str:
    """Print (and return) the summary table plus any notes (e.g. METEOR could not run)."""
    text = summary_table(report["results"])
    for task, notes in report.get("notes", {}).items():
        for n in notes:
            text += f"\nnote ({task}): {n}"
    print(text)
    return text
