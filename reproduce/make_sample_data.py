"""Make the small bundled sample data of data/sample/ (run once; the output is committed).

- 20 Newsgroups: 15 training and 5 test messages of each of the 20 groups, drawn with a fixed
  seed from the real data (messages of 80 to 1,200 characters once headers, quotes and
  signatures are stripped, so the demo runs quickly on a CPU).
- Dialogues: SAMSum's license does not allow shipping it, so the project writes its own short
  chat dialogues with one-sentence summaries, from templates, with a fixed seed.

Usage: python reproduce/make_sample_data.py ../shared/data data/sample
"""

import gzip
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qlora_kit.data import strip_newsgroup_message  # noqa: E402

NAMES = [
    "Anna",
    "Ben",
    "Carla",
    "Dev",
    "Emma",
    "Farid",
    "Grace",
    "Hugo",
    "Iris",
    "Jonas",
    "Kemal",
    "Lena",
    "Mia",
    "Noah",
    "Olga",
    "Pedro",
]
PLANS = [
    ("the cinema", "watch the new film"),
    ("the gym", "work out"),
    ("the market", "buy vegetables"),
    ("the library", "return some books"),
    ("the beach", "swim"),
    ("the office", "finish the report"),
    ("the station", "pick up Grandma"),
    ("the park", "walk the dog"),
    ("the pizzeria", "have dinner"),
    ("the vet", "take the cat for a check-up"),
    ("the concert", "see the band"),
    ("the garage", "get the car fixed"),
]
TIMES = ["7 am", "9 am", "noon", "2 pm", "4 pm", "6 pm", "7:30 pm", "9 pm"]
DAYS = ["today", "tomorrow", "on Saturday", "on Sunday", "on Friday"]


def make_dialogue(rng: random.Random) -> dict:
    a, b = rng.sample(NAMES, 2)
    (place, purpose), time, day = rng.choice(PLANS), rng.choice(TIMES), rng.choice(DAYS)
    kind = rng.randrange(3)
    if kind == 0:
        lines = [
            f"{a}: Are you free {day}?",
            f"{b}: I think so, why?",
            f"{a}: I want to go to {place} to {purpose}.",
            f"{b}: Sounds good. What time?",
            f"{a}: {time}?",
            f"{b}: Perfect, see you there!",
        ]
        summary = f"{a} and {b} will go to {place} {day} at {time} to {purpose}."
    elif kind == 1:
        lines = [
            f"{a}: I can't make it to {place} {day} :(",
            f"{b}: Oh no, what happened?",
            f"{a}: I'm sick, I have a fever.",
            f"{b}: Get well soon! I'll {purpose} on my own then.",
            f"{a}: Thanks, sorry!",
        ]
        summary = f"{a} is sick and can't go to {place} {day}, so {b} will {purpose} alone."
    else:
        lines = [
            f"{a}: Can you go to {place} for me {day}?",
            f"{b}: What for?",
            f"{a}: To {purpose}. I'm stuck at work.",
            f"{b}: OK, I'll go at {time}.",
            f"{a}: You're the best!",
        ]
        summary = f"{b} will go to {place} {day} at {time} to {purpose} for {a}."
    return {"dialogue": "\n".join(lines), "summary": summary}


def sample_newsgroups(path: Path, per_group: int, seed: int) -> list[dict]:
    rows = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        text = strip_newsgroup_message(row["text"].replace("\r\n", "\n"))
        if 80 <= len(text.strip()) <= 1200:
            by_label.setdefault(row["label"], []).append({"text": row["text"], "label": row["label"]})
    rng = random.Random(seed)
    chosen = [row for label in sorted(by_label) for row in rng.sample(by_label[label], per_group)]
    rng.shuffle(chosen)
    return chosen


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"{path}: {len(rows)} rows")


def main(source: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write(out / "newsgroups_train.jsonl", sample_newsgroups(source / "newsgroups" / "train.jsonl.gz", 15, seed=1))
    write(out / "newsgroups_test.jsonl", sample_newsgroups(source / "newsgroups" / "test.jsonl.gz", 5, seed=2))
    rng = random.Random(3)
    dialogues = [{"id": f"demo-{i}", **make_dialogue(rng)} for i in range(60)]
    write(out / "dialogues_train.jsonl", dialogues[:45])
    write(out / "dialogues_test.jsonl", dialogues[45:])


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
