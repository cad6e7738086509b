"""Writes the small data sets that ship with bertcli (all text composed here, by the project).

    python recipes/data/make_data.py

- tiny-corpus.txt: plain text for tokenizer training and tiny pretraining, one sentence per
  line and a blank line between documents (the Google BERT layout).
- reviews-train.tsv / reviews-dev.tsv: short movie-review sentences labelled negative/positive,
  with a header `sentence<TAB>label` (the GLUE SST-2 layout, label names instead of 0/1).
"""

from __future__ import annotations

import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

SUBJECTS = ["the film", "this movie", "the plot", "the acting", "the soundtrack", "the ending", "the script",
            "the cast", "the story", "the dialogue", "the camera work", "the lead actor", "the director's vision",
            "the second half", "the opening scene", "the pacing", "the humour", "the visual effects"]
POSITIVE = ["is wonderful", "was a delight", "is beautifully made", "felt fresh and honest", "is moving",
            "kept me smiling", "is clever and warm", "works brilliantly", "is a joy to watch", "shines",
            "is sharp and funny", "left me deeply touched", "is gripping from start to finish", "is superb",
            "deserves every award", "is charming"]
NEGATIVE = ["is dull", "was a mess", "is painfully slow", "felt lazy and cheap", "is boring",
            "made me check my watch", "is clumsy and cold", "falls completely flat", "is a chore to sit through",
            "drags", "is confused and loud", "left me completely cold", "is tedious from start to finish",
            "is awful", "deserves to be forgotten", "is irritating"]
INTENSIFIERS = ["", "", "really ", "truly ", "simply ", "honestly "]
NEGATED_POS = ["is not bad at all", "is never boring", "is far from dull", "was not a waste of time"]
NEGATED_NEG = ["is not good", "is never funny", "is far from clever", "was not worth the ticket"]
CLOSERS = {"positive": ["i loved it", "highly recommended", "go and see it", "a real treat"],
           "negative": ["i hated it", "avoid it", "skip this one", "a real letdown"]}

PLACES = ["the harbour town", "the mountain village", "the old library", "the river valley", "the city market",
          "the northern coast", "the quiet farm", "the university", "the railway station", "the small island"]
PEOPLE = ["the baker", "a young teacher", "the old fisherman", "two students", "the mayor", "a travelling musician",
          "the doctor", "her brother", "the gardener", "a curious child", "the engineer", "the painter"]
ACTIONS = ["walked to", "wrote a letter about", "dreamed of", "built a small house near", "sold bread in",
           "sang songs about", "drew a map of", "repaired the roof in", "read old stories about", "returned to",
           "planted trees around", "counted the boats in"]
TIMES = ["in the morning", "every winter", "after the storm", "before the festival", "late at night",
         "during the long summer", "on a rainy day", "at dawn", "for many years", "once a week"]
DETAILS = ["The weather was cold and clear.", "Nobody expected what happened next.", "It was a simple plan.",
           "The streets were full of people.", "Everyone remembered that day.", "The lamps were lit one by one.",
           "A bell rang somewhere in the distance.", "The bread smelled of butter and salt.",
           "The water was calm and grey.", "Birds gathered on the wires.", "It took longer than anyone thought.",
           "The numbers did not add up at first.", "They laughed about it later."]


def review(rng: random.Random, label: str) -> str:
    subject = rng.choice(SUBJECTS)
    if rng.random() < 0.2:
        verb = rng.choice(NEGATED_POS if label == "positive" else NEGATED_NEG)
    else:
        verb = rng.choice(INTENSIFIERS) + rng.choice(POSITIVE if label == "positive" else NEGATIVE)
    text = f"{subject} {verb}"
    if rng.random() < 0.4:
        other = rng.choice([s for s in SUBJECTS if s != subject])
        contrast = rng.choice(NEGATIVE if label == "positive" else POSITIVE)
        text = f"although {other} {contrast} , {text}"  # the main clause carries the label
    if rng.random() < 0.3:
        text += f" . {rng.choice(CLOSERS[label])}"
    return text + " ."


def reviews(rng: random.Random, count: int) -> list[tuple[str, str]]:
    rows, seen = [], set()
    while len(rows) < count:
        label = rng.choice(["negative", "positive"])
        text = review(rng, label)
        if text not in seen:
            seen.add(text)
            rows.append((text, label))
    return rows


def corpus(rng: random.Random, documents: int) -> str:
    out = []
    for _ in range(documents):
        place = rng.choice(PLACES)
        lines = []
        for _ in range(rng.randint(3, 8)):
            if rng.random() < 0.3:
                lines.append(rng.choice(DETAILS))
            else:
                sentence = f"{rng.choice(PEOPLE)} {rng.choice(ACTIONS)} {place} {rng.choice(TIMES)}."
                lines.append(sentence[0].upper() + sentence[1:])
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def main() -> None:
    rng = random.Random(20261128)
    (HERE / "tiny-corpus.txt").write_text(corpus(rng, 600), encoding="utf-8")
    rows = reviews(rng, 600)
    for name, part in [("reviews-train.tsv", rows[:480]), ("reviews-dev.tsv", rows[480:])]:
        text = "sentence\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in part)
        (HERE / name).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
