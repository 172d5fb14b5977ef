"""The no-LLM reference of 20 Newsgroups, scored as the project scores itself: TF-IDF (1-2 grams, sublinear
tf) + LinearSVC on the training messages, stripped and cleaned by the project's own loader, predictions on the
test set with the same metrics and 95% bootstrap intervals. Needs scikit-learn (not a project requirement).

    python reproduce/tfidf_baseline.py --data_dir ../shared/data --out results/tfidf_baseline
"""

import argparse
import gzip
import json
import time
from pathlib import Path

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.svm import LinearSVC

from qlora_kit import data as data_lib
from qlora_kit.tasks import get_task


def main(args):
    task = get_task("classification")
    train, source = task.load_rows(
        file=str(Path(args.data_dir) / "newsgroups" / "train.jsonl.gz"), dataset="", split="train"
    )
    test, _ = task.load_rows(file=str(Path(args.data_dir) / "newsgroups" / "test.jsonl.gz"), dataset="", split="test")
    labels = data_lib.canonical_labels(train, source)
    started = time.perf_counter()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    classifier = LinearSVC().fit(vectorizer.fit_transform([r["input"] for r in train]), [r["target"] for r in train])
    predictions = list(classifier.predict(vectorizer.transform([r["input"] for r in test])))
    references = [r["target"] for r in test]
    metrics = {
        "n": len(test),
        **task.score(references, predictions, labels),
        "train_rows": len(train),
        "seconds": time.perf_counter() - started,
        "model": "TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True) + LinearSVC()",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    # the inference scripts' record layout, so that scripts/compare_runs.py pairs it with a model's test run
    with gzip.open(out / "predictions.jsonl.gz", "wt", encoding="utf-8") as file:
        for index, (reference, prediction) in enumerate(zip(references, predictions)):
            record = {"id": index, "output": prediction, "reference": reference, "parsed": prediction}
            file.write(json.dumps(record) + "\n")
    print(
        f"accuracy {100 * metrics['accuracy']:.2f}% {metrics['ci95']['accuracy']}, macro-F1 {100 * metrics['macro_f1']:.2f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/data")
    parser.add_argument("--out", default="results/tfidf_baseline")
    main(parser.parse_args())
