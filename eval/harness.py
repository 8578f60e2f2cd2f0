"""The few-shot evaluation loop (the Flamingo / OpenFlamingo protocol).

For every task x shot count x trial: choose demonstrations from the train split for each test
sample (seeded random draws, or RICES), build the prompt from the task's template
(`lmm.eval.prompts`), run the model in batches (generation for captioning / VQA / easy-vqa,
log-likelihood ranking for HatefulMemes / classification), then score with the reference metrics.

- Random demos: a sample's demos are drawn with a RNG seeded by (trial seed, task, sample id), so
  they do not depend on batching or sharding; `trials` trials use seeds seed, seed+1, ...; the
  mean and (population) std over trials are reported.
- RICES demos are deterministic: one trial.
- Zero-shot: `zero_shot_text_demos` (default 2) demonstrations are still drawn but shown without
  their images (OpenFlamingo's trick); 0 turns it off. easy-vqa (a chat model) uses none.
- Every number reported is x100 (CIDEr 1.05 -> 105.0; accuracy 0.5 -> 50.0), as in the papers.

The model needs `generate(prompts, images, max_new_tokens=, num_beams=)`, `score(prompts, images,
candidates)` for the ranking tasks and `embed_images(images)` for RICES (see `lmm.model.LMM`).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import metrics, prompts
from .results import ShardStore, aggregate_trials, summary_table, write_json
from .rices import RICES, FeatureCache, embed_paths
from .tasks import Sample, Task, TaskData, TaskDataError, load_easyvqa, load_image, parse_tasks

SHOTS = (0, 4, 8, 16, 32)
SCORE_CHUNK = 128  # candidates scored per model call (classification over many classes)


class EvalConfigError(ValueError):
    """A setting of the evaluation is invalid; the message names the option to change."""


@dataclass
class EvalConfig:
    tasks: list[str]
    shots: list[int] = field(default_factory=lambda: list(SHOTS))
    data_root: str | None = None
    limit: int | None = None            # evaluate the first N test samples (easy-vqa: of its seeded shuffle)
    trials: int = 3                     # random-demo trials (seeds seed .. seed + trials - 1)
    seed: int = 0
    rices: bool = False
    batch_size: int = 8
    out: str | None = None              # aggregate JSON; None writes nothing and resumes nothing
    zero_shot_text_demos: int = prompts.ZERO_SHOT_TEXT_DEMOS
    num_beams: int = 3                  # OpenFlamingo generates with 3 beams
    max_new_tokens: int | None = None   # None: the per-task default in prompts.GENERATION
    shard_size: int = 64
    rices_cache: str | None = None      # RICES feature cache folder (default: <out>.shards/rices; none without out)
    meteor: bool = True
    progress: bool = True

    def validate(self) -> None:
        if not self.tasks:
            raise EvalConfigError("no tasks given: pass --tasks, e.g. --tasks coco,vqav2")
        if not self.shots or any((not isinstance(s, int)) or s < 0 for s in self.shots):
            raise EvalConfigError(f"--shots must be non-negative integers, got {self.shots}")
        for name, v in (("--trials", self.trials), ("--batch-size", self.batch_size),
                        ("shard_size", self.shard_size), ("--num-beams", self.num_beams)):
            if v < 1:
                raise EvalConfigError(f"{name} must be at least 1, got {v}")
        if self.limit is not None and self.limit < 1:
            raise EvalConfigError(f"--limit must be at least 1, got {self.limit}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise EvalConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.zero_shot_text_demos < 0:
            raise EvalConfigError("zero_shot_text_demos must be >= 0")
        needs_root = [t.name for t in parse_tasks(",".join(self.tasks)) if t.kind != "easyvqa"]
        if needs_root and self.data_root is None:
            raise EvalConfigError(f"pass --data-root PATH: the files of {', '.join(needs_root)} are read from it "
                                  f"(layout: `python -m pydoc lmm.eval.tasks`)")
        if needs_root and not Path(self.data_root).is_dir():
            raise EvalConfigError(f"--data-root {self.data_root} is not a folder")


def work_paths(out: str | Path) -> tuple[Path, Path]:
    """(shards folder, predictions folder) beside the aggregate JSON: results.json -> results.shards/, results.predictions/."""
    out = Path(out)
    return out.with_name(out.stem + ".shards"), out.with_name(out.stem + ".predictions")


def random_demo_indices(pool_size: int, k: int, seed: int, task: str, sample_id: str) -> list[int]:
    """`k` distinct train indices for one test sample; the same for the same (seed, task, sample)."""
    if k > pool_size:
        raise EvalConfigError(f"{task}: {k} demonstrations asked but the train split has {pool_size} samples; "
                              f"lower --shots")
    return random.Random(f"{seed}|{task}|{sample_id}").sample(range(pool_size), k)


# ------------------------------------------------------------------ prompts and model calls

def build_inputs(task: Task, query: Sample, demos: list[Sample], text_only: bool, model=None):
    """(prompt, image paths) for one test sample: the demonstrations, then the query."""
    if task.kind == "easyvqa":
        from .easyvqa import easy_vqa_prompt

        return easy_vqa_prompt(model, query, demos)  # a chat prompt; its demos keep their images
    pairs = [(d.target, d.question) for d in demos]
    prompt = prompts.build_prompt(task.template, pairs, query.question, text_only_demos=text_only)
    paths = ([] if text_only else [d.image for d in demos]) + [query.image]
    return prompt, paths


def _generation_kwargs(task: Task, cfg: EvalConfig) -> dict:
    if task.kind == "easyvqa":
        from .easyvqa import GENERATION

        base = dict(GENERATION)
    elif task.kind in prompts.GENERATION:
        base = dict(prompts.GENERATION[task.kind], num_beams=cfg.num_beams)
    else:
        return {}  # ranking tasks do not generate
    if cfg.max_new_tokens is not None:
        base["max_new_tokens"] = cfg.max_new_tokens
    return base


def _infer_batch(model, task: Task, data: TaskData, batch: list[Sample], demos: list[list[Sample]],
                 text_only: bool, cfg: EvalConfig) -> list[dict]:
    built = [build_inputs(task, s, d, text_only, model) for s, d in zip(batch, demos)]
    texts = [p for p, _ in built]
    images = [[load_image(x) if isinstance(x, str) else x for x in paths] for _, paths in built]
    base = [{"id": s.id, "demos": [d.id for d in ds]} for s, ds in zip(batch, demos)]
    with torch.no_grad():
        if task.kind in ("caption", "vqa", "easyvqa"):
            outs = model.generate(texts, images, **_generation_kwargs(task, cfg))
            if len(outs) != len(batch):
                raise RuntimeError(f"model.generate returned {len(outs)} texts for {len(batch)} prompts")
            post = {"caption": prompts.postprocess_caption, "vqa": prompts.postprocess_vqa,
                    "easyvqa": lambda t: t.strip()}[task.kind]
            return [dict(r, prediction=post(o), raw=o) for r, o in zip(base, outs)]
        ranked = [prompts.ranking_inputs(t, data.classes) for t in texts]
        texts, candidates = [p for p, _ in ranked], ranked[0][1]
        if any(c != candidates for _, c in ranked):
            raise ValueError("ranking prompts of one batch must end alike (the template's text before {answer})")
        cols = []
        for i in range(0, len(candidates), SCORE_CHUNK):
            cols.append(torch.as_tensor(model.score(texts, images, candidates[i:i + SCORE_CHUNK])).float().cpu())
        scores = torch.cat(cols, dim=1)
    if tuple(scores.shape) != (len(batch), len(candidates)):
        raise RuntimeError(f"model.score returned shape {tuple(scores.shape)}, expected {(len(batch), len(candidates))}")
    out = []
    for r, row in zip(base, scores):
        if task.kind == "hateful":
            out.append(dict(r, logprobs=row.tolist(), prediction=data.classes[int(row.argmax())]))
        else:
            top = torch.sort(-row, stable=True).indices[:5].tolist()
            out.append(dict(r, top5=top, top5_logprobs=[float(row[i]) for i in top],
                            prediction=data.classes[top[0]]))
    return out


# ------------------------------------------------------------------ scoring one trial

def score_records(task: Task, data: TaskData, test: list[Sample], records: list[dict], cfg: EvalConfig):
    """(metrics x100, notes, records with per-sample fields added) for one trial."""
    by_id = {s.id: s for s in test}
    notes: list[str] = []
    if task.kind == "caption":
        m = metrics.caption_metrics({r["id"]: r["prediction"] for r in records},
                                    {r["id"]: list(by_id[r["id"]].answers) for r in records}, meteor=cfg.meteor)
        notes += m["notes"]
        out = {k: (None if m[k] is None else 100.0 * m[k]) for k in ("cider", "bleu4", "meteor")}
        for r in records:
            r["references"] = list(by_id[r["id"]].answers)
            r["cider"] = m["per_sample_cider"][r["id"]]
        return out, notes, records
    if task.kind == "vqa":
        m = metrics.vqa_metrics({r["id"]: r["prediction"] for r in records},
                                {r["id"]: by_id[r["id"]].answers for r in records})
        for r in records:
            r["answers"] = list(by_id[r["id"]].answers)
            r["vqa_accuracy"] = m["per_sample"][r["id"]]
        return {"vqa_accuracy": 100.0 * m["vqa_accuracy"]}, notes, records
    if task.kind == "hateful":
        labels = [by_id[r["id"]].label for r in records]
        p_yes = [float(torch.softmax(torch.tensor(r["logprobs"]), 0)[1]) for r in records]
        m = metrics.roc_auc(labels, p_yes)
        notes += m["notes"]
        for r, y, p in zip(records, labels, p_yes):
            r["label"], r["p_hateful"] = y, p
        acc = sum(int(r["prediction"] == data.classes[y]) for r, y in zip(records, labels)) / len(records)
        return {"roc_auc": None if m["roc_auc"] is None else 100.0 * m["roc_auc"], "accuracy": 100.0 * acc}, notes, records
    if task.kind == "classify":
        labels = [by_id[r["id"]].label for r in records]
        m = metrics.topk_accuracy(labels, [r["top5"] for r in records])
        for r, y in zip(records, labels):
            r["label"] = data.classes[y]
        return {k: 100.0 * v for k, v in m.items()}, notes, records
    if task.kind == "easyvqa":
        answers = [by_id[r["id"]].answers[0] for r in records]
        m = metrics.exact_match_accuracy([r["prediction"] for r in records], answers)
        for r, a in zip(records, answers):
            r["answer"], r["correct"] = a, metrics.normalize_exact(r["prediction"]) == metrics.normalize_exact(a)
        return {"accuracy": 100.0 * m["accuracy"], "correct": m["correct"]}, notes, records
    raise ValueError(f"unknown task kind {task.kind!r}")


# ------------------------------------------------------------------ the run

def _check_model(model, task_list: list[Task], cfg: EvalConfig) -> None:
    need = set()
    for t in task_list:
        need.add("score" if t.kind in ("hateful", "classify") else "generate")
    if cfg.rices:
        need.add("embed_images")
    missing = sorted(n for n in need if not callable(getattr(model, n, None)))
    if missing:
        raise EvalConfigError(f"the model lacks {', '.join(missing)}(): evaluate an lmm.model.LMM (or an object "
                              f"with the same methods)")


def _rices_demos(model, task: Task, data: TaskData, test: list[Sample], k: int, cfg: EvalConfig,
                 shard_root: Path | None, model_id: str) -> list[list[int]]:
    """Per test sample, the train indices of its `k` RICES demos (closest last).

    Retrieval runs over the distinct train images (VQA datasets ask several questions per image);
    an image stands for its first train sample, so the demos always show `k` different images.
    Features are cached under `<out>.shards/rices/` (or `cfg.rices_cache`)."""
    first_sample: dict[str, int] = {}
    for i, s in enumerate(data.train):
        first_sample.setdefault(s.image, i)
    train_images = list(first_sample)
    if k > len(train_images):
        raise EvalConfigError(f"{task.name}: {k} demonstrations asked but the train split has {len(train_images)} "
                              f"distinct images; lower --shots")
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


def load_task_data(task: Task, cfg: EvalConfig) -> TaskData:
    if task.kind == "easyvqa":
        data = load_easyvqa()
        random.Random(cfg.seed).shuffle(data.test)  # --limit N then takes a seeded random subset
        return data
    if cfg.data_root is None:
        raise EvalConfigError(f"{task.name} reads its files from --data-root; pass --data-root PATH "
                              f"(layout: `python -m pydoc lmm.eval.tasks`)")
    root = Path(cfg.data_root)
    if not root.is_dir():
        raise EvalConfigError(f"--data-root {root} is not a folder")
    return task.load(root)


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
    task_list = parse_tasks(",".join(cfg.tasks))
    _check_model(model, task_list, cfg)
    if any(t.kind == "caption" for t in task_list):
        metrics.require_java()  # fail before hours of generation, not after
    model_id = model_id or default_model_id(model)
    shard_root, pred_root = work_paths(cfg.out) if cfg.out is not None else (None, None)
    if hasattr(model, "eval"):
        model.eval()

    results: dict = {}
    notes: dict = {}
    files: dict = {}
    for task in task_list:
        data = load_task_data(task, cfg)
        files[task.name] = data.files
        test = data.test[: cfg.limit] if cfg.limit else list(data.test)
        if not test:
            raise TaskDataError(f"{task.name}: the test split is empty")
        demo_counts = {s: (s if s > 0 else (0 if task.kind == "easyvqa" else cfg.zero_shot_text_demos))
                       for s in cfg.shots}
        if max(demo_counts.values()) > len(data.train):  # say so before any work on this task
            raise EvalConfigError(f"{task.name}: {max(demo_counts.values())} demonstrations asked but the train split "
                                  f"has {len(data.train)} samples; lower --shots")
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
                trial, trial_notes = _run_trial(model, task, data, test, shots, n_demos, selection, cfg.seed + t,
                                                rices_order, cfg, model_id, shard_root, pred_root,
                                                desc=f"{task.name} {shots}-shot"
                                                + (f" trial {t + 1}/{n_trials}" if n_trials > 1 else ""))
                trials.append(trial)
                for n in trial_notes:
                    if n not in notes.setdefault(task.name, []):
                        notes[task.name].append(n)
            mean, std = aggregate_trials(trials)
            results[task.name][str(shots)] = {"primary_metric": task.primary_metric, "mean": mean, "std": std,
                                              "n": len(test), "demo_selection": selection, "n_demos": n_demos,
                                              "text_only_demos": shots == 0 and n_demos > 0, "trials": trials}
    cfg_dict = asdict(cfg)
    cfg_dict.pop("progress", None)
    report = {"model": model_id, "config": cfg_dict, "results": results, "notes": notes, "data_files": files,
              "scale": "all metrics x100 (CIDEr as in the COCO tables; accuracies and ROC-AUC in %)"}
    if cfg.out is not None:
        write_json(Path(cfg.out), report)
    return report


def _run_trial(model, task: Task, data: TaskData, test: list[Sample], shots: int, n_demos: int, selection: str,
               seed: int, rices_order, cfg: EvalConfig, model_id: str, shard_root, pred_root, desc: str):
    """One task x shots x trial: choose demos, run (or reload) the shards, score. Returns (trial, notes)."""
    if selection == "rices":
        def demo_fn(i, sample):
            return [data.train[j] for j in rices_order[i][-n_demos:]]
    else:
        def demo_fn(i, sample):
            return [data.train[j] for j in random_demo_indices(len(data.train), n_demos, seed, task.name, sample.id)]
    spec = {"model": model_id, "task": task.name, "kind": task.kind,
            "template": task.template.text if task.template else "chat", "shots": shots, "n_demos": n_demos,
            "selection": selection, "seed": seed if selection == "random" else None,
            "generation": _generation_kwargs(task, cfg), "files": [_file_stamp(f) for f in data.files],
            "shard_size": cfg.shard_size, "easyvqa_shuffle_seed": cfg.seed if task.kind == "easyvqa" else None}
    store = ShardStore(shard_root, f"{task.name}/{shots}shot-{selection}-seed{seed}", spec)
    records = run_unit(model, task, data, test, demo_fn, text_only=(shots == 0), cfg=cfg, store=store, desc=desc)
    scores, notes, records = score_records(task, data, test, records, cfg)
    trial = {"seed": seed if selection == "random" else None, "metrics": scores, "n": len(test)}
    if pred_root is not None:
        pred_file = pred_root / f"{task.name}_{shots}shot_{selection}_seed{seed}.json"
        write_json(pred_file, records)
        trial["predictions_file"] = str(pred_file)
    else:
        trial["predictions"] = records
    return trial, notes


def run_unit(model, task: Task, data: TaskData, test: list[Sample], demo_fn, text_only: bool, cfg: EvalConfig,
             store: ShardStore, desc: str = "") -> list[dict]:
    """Per-sample records for one task x shots x trial, shard by shard, skipping finished shards."""
    from tqdm.auto import tqdm

    records: list[dict] = []
    bar = tqdm(total=len(test), desc=desc, unit="sample", disable=not cfg.progress)
    try:
        for index, start in enumerate(range(0, len(test), cfg.shard_size)):
            chunk = test[start:start + cfg.shard_size]
            ids = [s.id for s in chunk]
            done = store.load(index, ids)
            if done is None:
                done = []
                for b in range(0, len(chunk), cfg.batch_size):
                    batch = chunk[b:b + cfg.batch_size]
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


def print_summary(report: dict) -> str:
    """Print (and return) the summary table plus any notes (e.g. METEOR could not run)."""
    text = summary_table(report["results"])
    for task, notes in report.get("notes", {}).items():
        for n in notes:
            text += f"\nnote ({task}): {n}"
    print(text)
    return text
