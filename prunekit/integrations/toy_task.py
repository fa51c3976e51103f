"""The toy task as a local lmms-eval task (no download): ``python -m prunekit.integrations.toy_task FOLDER``.

Writes ``FOLDER/prunekit_toy.yaml`` and the questions (images included) as a saved ``datasets``
dataset; then ``lmms-eval --include_path FOLDER --tasks prunekit_toy --model prunekit`` scores the
toy model's exact-match accuracy.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

TASK = "prunekit_toy"

TASK_YAML = """\
task: {task}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function prunekit.integrations.toy_task.doc_to_visual
doc_to_text: !function prunekit.integrations.toy_task.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  do_sample: false
process_results: !function prunekit.integrations.toy_task.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.1
"""


def doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": float(results[0].strip() == doc["answer"])}


def write_toy_task(folder: str | Path, n: int = 100, seed: int = 4321) -> Path:
    """The task YAML and ``n`` seeded questions in ``folder``; returns the YAML's path."""
    import datasets

    from prunekit.toy.task import ToyTask

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    questions = ToyTask(seed).questions(n)
    columns: dict[str, list[Any]] = {
        "question": [q.question for q in questions],
        "answer": [q.answer for q in questions],
        "kind": [q.kind for q in questions],
        "image": [q.image for q in questions],
    }
    features = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "kind": datasets.Value("string"), "image": datasets.Image()})
    data = folder / "data"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(columns, features=features)}).save_to_disk(str(data))
    path = folder / f"{TASK}.yaml"
    path.write_text(TASK_YAML.format(task=TASK, data=data.resolve()))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("-n", type=int, default=100, help="questions")
    parser.add_argument("--seed", type=int, default=4321)
    args = parser.parse_args()
    path = write_toy_task(args.folder, args.n, args.seed)
    print(f"wrote {path}; run: lmms-eval --model prunekit --include_path {args.folder} --tasks {TASK}")


if __name__ == "__main__":
    main()
