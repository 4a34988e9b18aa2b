"""Train the `language` example classifier, with its baselines measured in the same run.

    python scripts/train_language.py                 # data/language/, models/language.safetensors
    python scripts/train_language.py --max-minutes 5 # a shorter run

1. builds the labelled snippets (scripts/language_data.py: python, c or cpp, from files this
   install carries, with their manifest);
2. measures two baselines on the same split: the majority class, and a bag-of-bytes
   multinomial logistic regression (each snippet's byte histogram, full-batch L-BFGS);
3. trains a `language` head on the default language model's final state, fine-tuning the
   encoder too (`lstm-serve train --task classify --init models/default.safetensors
   --fine-tune`; `--frozen` trains the head alone and leaves the language model as it was);
4. prints the three side by side and writes them to models/language.train/results.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import language_data  # noqa: E402

from server.training.classify import ClassifyConfig, scores, train_classifier  # noqa: E402
from server.training.labelled import Dataset, load_dataset  # noqa: E402


def confusion_of(truth: torch.Tensor, predicted: torch.Tensor, labels: int) -> torch.Tensor:
    confusion = torch.zeros(labels, labels, dtype=torch.long)
    confusion.index_put_((truth, predicted), torch.ones_like(truth), accumulate=True)
    return confusion


def byte_histograms(dataset: Dataset, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, 256] relative byte frequencies of each snippet (its <bos> left out), [N] labels."""
    examples = getattr(dataset, split)
    features = torch.zeros(len(examples), 256)
    for i, example in enumerate(examples):
        counts = torch.bincount(torch.tensor(example.tokens[1:]), minlength=256)[:256].float()
        features[i] = counts / counts.sum()
    return features, torch.tensor([e.label for e in examples])


def baselines(dataset: Dataset) -> dict[str, dict]:
    labels = len(dataset.labels)
    truth = torch.tensor([e.label for e in dataset.heldout])
    majority = max(range(labels), key=dataset.counts("train").__getitem__)
    results = {"majority class": scores(confusion_of(truth, torch.full_like(truth, majority), labels))}

    started = time.perf_counter()
    x, y = byte_histograms(dataset, "train")
    mean, std = x.mean(0), x.std(0) + 1e-6
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, labels)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (
            torch.nn.functional.cross_entropy(linear((x - mean) / std), y)
            + 1e-4 * linear.weight.square().sum()
        )
        loss.backward()
        return loss

    optimizer.step(closure)
    held_x, held_y = byte_histograms(dataset, "heldout")
    with torch.no_grad():
        predicted = linear((held_x - mean) / std).argmax(-1)
    results["bag-of-bytes logistic regression"] = {
        **scores(confusion_of(held_y, predicted, labels)),
        "seconds": time.perf_counter() - started,
    }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data/language")
    parser.add_argument("--out", type=Path, default=ROOT / "models/language.safetensors")
    parser.add_argument("--init", type=Path, default=ROOT / "models/default.safetensors")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--max-minutes", type=float, default=20.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--frozen", action="store_true", help="train the head only (the language model stays as it is)"
    )
    args = parser.parse_args()

    counts = language_data.build(args.data)
    print(f"data: {json.dumps(counts)}", file=sys.stderr)
    dataset = load_dataset(args.data / "train.jsonl", args.data / "eval.jsonl")
    results = baselines(dataset)
    config = ClassifyConfig(
        data=args.data / "train.jsonl",
        eval_data=args.data / "eval.jsonl",
        out=args.out,
        init=args.init,
        head="language",
        fine_tune=not args.frozen,
        lr=args.lr,
        epochs=args.epochs,
        max_minutes=args.max_minutes,
    )
    started = time.perf_counter()
    trained = train_classifier(config)
    how = "head only" if args.frozen else "fine-tuned"
    results[f"LSTM: the default model + a head, {how}"] = {
        **trained.model_dump(),
        "seconds": time.perf_counter() - started,
    }

    print(f"labels {list(dataset.labels)}; held-out snippets {len(dataset.heldout)} of {counts}")
    print("| model | held-out accuracy | macro-F1 | seconds |\n|---|---|---|---|")
    for name, r in results.items():
        seconds = f"{r['seconds']:.0f}" if "seconds" in r else "-"
        print(f"| {name} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {seconds} |")
    report = {
        "labels": list(dataset.labels),
        "snippets": counts,
        "results": results,
        "machine": {
            "cores": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    folder = args.out.with_suffix(".train")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
