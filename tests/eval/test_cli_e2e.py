"""`lmm eval` end to end: every task's official-format fixture, a tiny random LMM, 0 and 2 shots."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from lmm.cli.eval import register
from lmm.eval import evaluate_task

ALL_TASKS = ["coco", "flickr30k", "vqav2", "okvqa", "textvqa", "vizwiz", "hatefulmemes", "imagenet", "easyvqa"]
LIMIT = 2


def make_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main():  # a group, as in the real `lmm` app
        pass

    register(app)
    return app


def run(*args):
    return CliRunner().invoke(make_app(), ["eval", *map(str, args)])


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, data_root, tiny_model_dir):
    out = tmp_path_factory.mktemp("cli") / "results.json"
    args = [
        "--model",
        tiny_model_dir,
        "--tasks",
        ",".join(ALL_TASKS),
        "--shots",
        "0,2",
        "--data-root",
        data_root,
        "--limit",
        LIMIT,
        "--out",
        out,
        "--trials",
        1,
        "--batch-size",
        2,
        "--num-beams",
        1,
        "--no-meteor",
        "--max-new-tokens",
        6,
        "--no-progress",
    ]
    result = run(*args)
    return args, out, result


def test_every_task_runs_at_0_and_2_shots(cli_run):
    _, out, result = cli_run
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["results"]) == set(ALL_TASKS)
    for task in ALL_TASKS:
        for shots in ("0", "2"):
            r = report["results"][task][shots]
            assert r["n"] == LIMIT
            assert isinstance(r["mean"][r["primary_metric"]], float)
            preds = json.loads(open(r["trials"][0]["predictions_file"]).read())
            assert len(preds) == LIMIT and all("prediction" in p for p in preds)
    assert report["results"]["vqav2"]["0"]["text_only_demos"] is True
    assert report["results"]["easyvqa"]["0"]["n_demos"] == 0  # the chat model gets no text-only demos


def test_summary_table_is_printed(cli_run):
    _, out, result = cli_run
    rows = [line.split() for line in result.output.splitlines()]
    assert ["task", "shots", "metric", "score", "trials", "n"] in rows
    for task in ALL_TASKS:
        assert sum(1 for r in rows if r[:1] == [task]) == 2
    assert f"results: {out}" in result.output


def test_rerun_reuses_every_finished_shard(cli_run):
    args, out, _ = cli_run
    shards = sorted((out.parent / "results.shards").rglob("shard_*.json"))
    before = {p: p.stat().st_mtime_ns for p in shards}
    first = json.loads(out.read_text())["results"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in shards} == before
    assert json.loads(out.read_text())["results"] == first


def test_easy_vqa_python_entry_point_reports_the_cli_number(cli_run, tiny_model):
    _, out, _ = cli_run
    r = json.loads(out.read_text())["results"]["easyvqa"]["0"]
    cli_preds = json.loads(open(r["trials"][0]["predictions_file"]).read())
    direct = evaluate_task(tiny_model, "easyvqa", limit=LIMIT, seed=0, batch_size=2, max_new_tokens=6)
    assert direct["metrics"]["accuracy"] == r["mean"]["accuracy"]
    assert direct["metrics"]["accuracy"] == 100.0 * direct["metrics"]["correct"] / LIMIT
    assert [p["prediction"] for p in direct["predictions"]] == [p["prediction"] for p in cli_preds]
    assert "random.Random(0)" in direct["subset"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "vqav2"], "--data-root"),
        (["--tasks", "vqav2", "--shots", "0,four", "--data-root", "."], "--shots"),
        (["--tasks", "cocoo", "--data-root", "."], "Did you mean 'coco'"),
    ],
)
def test_user_errors_exit_with_a_message(tiny_model_dir, extra, message):
    result = run("--model", tiny_model_dir, *extra, "--no-progress")
    assert result.exit_code == 2
    assert message in result.output


def test_a_wrong_model_path_is_reported(tmp_path):
    result = run("--model", tmp_path / "nope", "--tasks", "easyvqa", "--no-progress")
    assert result.exit_code == 2 and "not a saved lmm model directory" in result.output
