"""lm-eval task accuracy over the in-memory model, on a tiny multiple-choice task built in-test.

The accuracies are checked against the definition computed by hand from the model's own
log-likelihoods of each choice; every bad task input is one line, exit code 2, before any model loads.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys

import pytest
import torch
import yaml

pytest.importorskip("lm_eval", reason="task accuracy needs lm-eval (pip install lm-eval)")

import hypercompress  # noqa: E402
from hypercompress.eval import evaluation  # noqa: E402

from conftest import WORDS, make_model, make_tokenizer  # noqa: E402
from test_cli import assert_one_line_error, run  # noqa: E402

DOCS = 7


def _phrase(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _docs() -> list[dict]:
    rng = random.Random(5)
    return [{"question": _phrase(rng, 3, 6), "choices": [_phrase(rng, 1, 3) for _ in range(rng.choice((2, 3, 4)))],
             "label": 0} for _ in range(DOCS)]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """tiny/tiny_mc.yaml reading tiny/data/test.jsonl (a path relative to the YAML), plus a task that
    would read the hub and one whose data file is missing."""
    root = tmp_path_factory.mktemp("tasks")
    (root / "tiny" / "data").mkdir(parents=True)
    docs = _docs()
    for i, doc in enumerate(docs):
        doc["label"] = i % len(doc["choices"])
    (root / "tiny" / "data" / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    base = {"output_type": "multiple_choice", "test_split": "test", "doc_to_text": "{{question}}",
            "doc_to_target": "{{label}}", "doc_to_choice": "{{choices}}",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]}
    tasks = {
        "tiny/tiny_mc.yaml": {"task": "tiny_mc", "tag": "tiny_tag", "dataset_path": "json",
                              "dataset_kwargs": {"data_files": {"test": "data/test.jsonl"}}, **base},
        "hub_arc.yaml": {"task": "hub_arc", "dataset_path": "allenai/ai2_arc", "dataset_name": "ARC-Easy", **base},
        "lost.yaml": {"task": "lost_data", "dataset_path": "json",
                      "dataset_kwargs": {"data_files": {"test": "nowhere.jsonl"}}, **base},
    }
    for name, config in tasks.items():
        (root / name).write_text(yaml.safe_dump(config))
    return root


def _docs_of(task_dir) -> list[dict]:
    return [json.loads(line) for line in (task_dir / "tiny" / "data" / "test.jsonl").read_text().splitlines()]


@torch.inference_mode()
def hand_accuracy(model, tokenizer, docs) -> dict[str, float]:
    """acc / acc_norm by their definition: the gold choice has the highest sum of log p(choice token |
    context, earlier choice tokens) (acc_norm: divided by the choice's length in characters)."""
    hits, norm_hits = [], []
    for doc in docs:
        context = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            log_p = model(input_ids=torch.tensor([whole])).logits[0].float().log_softmax(-1)
            scores.append(sum(log_p[t - 1, whole[t]].item() for t in range(len(context), len(whole))))
        hits.append(float(max(range(len(scores)), key=scores.__getitem__) == doc["label"]))
        norm = [s / len(c) for s, c in zip(scores, doc["choices"])]
        norm_hits.append(float(max(range(len(norm)), key=norm.__getitem__) == doc["label"]))
    return {"acc": statistics.mean(hits), "acc_stderr": statistics.stdev(hits) / math.sqrt(len(hits)),
            "acc_norm": statistics.mean(norm_hits),
            "acc_norm_stderr": statistics.stdev(norm_hits) / math.sqrt(len(norm_hits))}


def _assert_matches(row: dict, expected: dict, docs: int) -> None:
    assert row["docs"] == docs and row["num_fewshot"] == 0
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, abs=1e-9), key


def test_python_api_accuracy_matches_the_log_likelihoods(task_dir):
    model, tokenizer = make_model("llama"), make_tokenizer()
    result = hypercompress.evaluate(model, tokenizer=tokenizer, tasks="tiny_mc", task_dir=task_dir, limit=5)
    row = result.tasks["tiny_mc"]
    _assert_matches(row, hand_accuracy(model, tokenizer, _docs_of(task_dir)[:5]), docs=5)
    assert row["docs_available"] == DOCS
    assert result.ppl is None and "lm-eval 0.4" in result.tasks_protocol and "5 of 7 docs" in result.tasks_protocol


def test_cli_tasks_on_an_artifact_in_memory(model_dirs, text_file, task_dir, tmp_path):
    """The artifact is scored as loaded (its compressed modules), next to its perplexity."""
    artifact = tmp_path / "rtn"
    assert run("compress", model_dirs["llama"], "--method", "rtn", "--set", "bits=3", "--out", artifact).exit_code == 0
    report = tmp_path / "r.json"
    before = set(tmp_path.rglob("*"))
    result = run("evaluate", artifact, "--data", text_file, "--seq-len", 32, "--max-windows", 2,
                 "--tasks", "tiny_mc", "--task-dir", task_dir, "--json", report)
    assert result.exit_code == 0, result.output
    assert "tiny_mc" in result.stdout and "acc_norm" in result.stdout and "tasks protocol: lm-eval" in result.stdout
    data = json.loads(report.read_text())
    model, tokenizer = hypercompress.load(artifact)
    _assert_matches(data["tasks"]["tiny_mc"], hand_accuracy(model, tokenizer, _docs_of(task_dir)), docs=DOCS)
    assert data["ppl"] > 1 and data["windows"] == 2
    assert set(tmp_path.rglob("*")) - before == {report, artifact / "evaluations.json"}  # nothing re-saved, the result kept


@pytest.fixture
def no_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the task input was checked")
    monkeypatch.setattr(evaluation, "load_model", fail)


@pytest.mark.parametrize("args, needles", [
    (["--tasks", "tiny_mc", "--task-dir", "{missing}"], ["task folder not found"]),
    (["--tasks", "arc_easy", "--task-dir", "{tasks}"], ["--tasks arc_easy", "hub_arc, lost_data, tiny_mc"]),
    (["--tasks", "tiny_tag", "--task-dir", "{tasks}"], ["a group or tag, not a task", "tiny_mc"]),
    (["--tasks", "hub_arc", "--task-dir", "{tasks}"], ["hub_arc", "Hugging Face hub", "allenai/ai2_arc"]),
    (["--tasks", "lost_data", "--task-dir", "{tasks}"], ["nowhere.jsonl not found"]),
    (["--tasks", "", "--task-dir", "{tasks}"], ["--tasks is empty"]),
    (["--tasks", " , ", "--task-dir", "{tasks}"], ["--tasks is empty"]),
    (["--tasks", "tiny_mc"], ["--tasks needs --task-dir"]),
    (["--task-dir", "{tasks}"], ["--task-dir needs --tasks"]),
    ([], ["nothing to measure"]),
    (["--tasks", "tiny_mc", "--task-dir", "{tasks}", "--limit", 0], ["--limit"]),
])
def test_bad_task_input(args, needles, model_dirs, task_dir, tmp_path, no_loading, no_hang):
    places = {"{missing}": str(tmp_path / "no-such-folder"), "{tasks}": str(task_dir)}
    args = [places.get(a, a) if isinstance(a, str) else a for a in args]
    result = run("evaluate", model_dirs["llama"], *args, "--json", tmp_path / "r.json")
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "r.json").exists()


def test_a_task_that_lm_eval_cannot_build_is_one_line(task_dir, tmp_path, no_loading):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.jsonl").write_text("{not json\n")
    config = yaml.safe_load((task_dir / "tiny" / "tiny_mc.yaml").read_text())
    config.update(task="bad_json", dataset_kwargs={"data_files": {"test": "bad.jsonl"}})
    (broken / "bad.yaml").write_text(yaml.safe_dump(config))
    assert_one_line_error(run("evaluate", "smollm2-135m", "--tasks", "bad_json", "--task-dir", broken),
                          "task bad_json: lm-eval could not load it")


def test_a_relative_task_dir_works(task_dir, monkeypatch):
    """--task-dir tasks (relative, as a user types it): the same accuracy as the absolute path."""
    model, tokenizer = make_model("llama"), make_tokenizer()
    absolute = hypercompress.evaluate(model, tokenizer=tokenizer, tasks="tiny_mc", task_dir=task_dir, limit=5)
    monkeypatch.chdir(task_dir.parent)
    relative = hypercompress.evaluate(model, tokenizer=tokenizer, tasks="tiny_mc", task_dir=task_dir.name, limit=5)
    assert relative.tasks["tiny_mc"]["acc"] == absolute.tasks["tiny_mc"]["acc"]


@pytest.fixture
def outside_git(tmp_path, monkeypatch):
    """The working folder is not in a git repository (where `git describe` complains)."""
    if shutil.which("git") is None:
        pytest.skip("no git: nothing to complain")
    monkeypatch.chdir(tmp_path)
    if subprocess.run(["git", "rev-parse"], capture_output=True).returncode == 0:
        pytest.skip(f"{tmp_path} is inside a git repository")


def test_lm_evals_git_describe_says_nothing_outside_a_repository(task_dir, outside_git, capfd):
    model, tokenizer = make_model("llama"), make_tokenizer()
    hypercompress.evaluate(model, tokenizer=tokenizer, tasks="tiny_mc", task_dir=task_dir, limit=2)
    assert "not a git repository" not in capfd.readouterr().err


def test_only_gits_complaint_is_held_back(outside_git, capfd):
    from hypercompress.eval.harness import _without_git_complaint

    with _without_git_complaint():
        os.write(2, b"before\n")
        subprocess.run(["git", "describe", "--always"], stdout=subprocess.DEVNULL)
        print("after", file=sys.stderr)
    print("restored", file=sys.stderr)
    err = capfd.readouterr().err
    assert "before\n" in err and "after\n" in err and "restored" in err and "not a git repository" not in err


def _code_folders(root, task_dir, marker):
    """Three task folders that would run code (each creates `marker`): a !function module, an include
    of a YAML (with its Python) outside the folder, and a template reaching os through Jinja."""
    config = yaml.safe_load((task_dir / "tiny" / "tiny_mc.yaml").read_text())
    config["dataset_kwargs"] = {"data_files": {"test": str(task_dir / "tiny" / "data" / "test.jsonl")}}
    config.pop("tag", None)
    code = f"def process_docs(docs):\n    open({str(marker)!r}, 'w').close()\n    return docs\n"
    folders = {}
    fn = root / "fn"
    fn.mkdir()
    (fn / "utils.py").write_text(code)
    (fn / "fn.yaml").write_text(yaml.safe_dump({**config, "task": "fn_task"}) + "process_docs: !function utils.process_docs\n")
    folders["fn_task"] = fn
    other, inc = root / "other", root / "inc"
    other.mkdir()
    inc.mkdir()
    (other / "utils.py").write_text(code)
    (other / "x.yaml").write_text(yaml.safe_dump({k: v for k, v in config.items() if k != "task"})
                                  + "process_docs: !function utils.process_docs\n")
    (inc / "inc.yaml").write_text(yaml.safe_dump({"task": "inc_task", "include": "../other/x.yaml"}))
    folders["inc_task"] = inc
    jinja = root / "jinja"
    jinja.mkdir()
    template = "{{ lipsum.__globals__['os'].system('touch " + str(marker) + "') }} {{question}}"
    (jinja / "j.yaml").write_text(yaml.safe_dump({**config, "task": "jinja_task", "doc_to_text": template}))
    folders["jinja_task"] = jinja
    return folders


@pytest.mark.parametrize("task, needle", [("fn_task", "runs Python from its folder (!function utils.process_docs"),
                                          ("inc_task", "outside --task-dir"),
                                          ("jinja_task", "a template reaches Python")])
def test_a_task_folder_runs_no_code_unless_trusted(task, needle, task_dir, tmp_path, no_loading):
    marker = tmp_path / "ran"
    folder = _code_folders(tmp_path, task_dir, marker)[task]
    result = run("evaluate", "smollm2-135m", "--tasks", task, "--task-dir", folder, "--limit", 2)
    assert_one_line_error(result, needle, "--trust-task-code")
    assert not marker.exists()


def test_a_trusted_task_folder_runs_its_code(task_dir, tmp_path):
    marker = tmp_path / "ran"
    folder = _code_folders(tmp_path, task_dir, marker)["fn_task"]
    result = hypercompress.evaluate(make_model("llama"), tokenizer=make_tokenizer(), tasks="fn_task",
                                    task_dir=folder, limit=2, trust_task_code=True)
    assert marker.exists() and result.tasks["fn_task"]["docs"] == 2


def test_tasks_run_with_the_dynamic_cache_and_the_static_setting_returns(task_dir, monkeypatch):
    """A model `load` set up for static decode (CUDA) is evaluated with the dynamic cache: lm-eval's
    generate_until would recompile a static step at every longer batch."""
    import lm_eval

    model, tokenizer = make_model("llama"), make_tokenizer()
    model.generation_config.cache_implementation = "static"
    seen, original = [], lm_eval.simple_evaluate

    def recording(*args, **kwargs):
        seen.append(model.generation_config.cache_implementation)
        return original(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", recording)
    hypercompress.evaluate(model, tokenizer=tokenizer, tasks="tiny_mc", task_dir=task_dir, limit=2)
    assert seen == [None] and model.generation_config.cache_implementation == "static"
