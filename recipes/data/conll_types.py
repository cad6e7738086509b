"""Writes a multi-label data set for recipes/multilabel-conll-types.yaml from CoNLL-2003: each
sentence, and the entity types it mentions (PER, ORG, LOC, MISC: none, one or several), as
`text<TAB>labels` with the labels joined by commas. The text stays on your machine (CoNLL-2003
is Reuters text, research use only).

    python recipes/data/conll_types.py --data ../shared/data --out runs/conll-types
"""

from __future__ import annotations

import argparse
from pathlib import Path


def sentences(path: Path) -> list[tuple[list[str], set[str]]]:
    out, words, types = [], [], set()
    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if words:
                out.append((words, types))
            words, types = [], set()
            continue
        words.append(fields[0])
        if fields[-1] != "O":
            types.add(fields[-1].split("-", 1)[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the folder holding conll2003/")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, target in (("train.txt", "train.tsv"), ("valid.txt", "dev.tsv")):
        rows = [(" ".join(w), ",".join(sorted(t))) for w, t in sentences(args.data / "conll2003" / name)]
        (args.out / target).write_text("text\tlabels\n" + "".join(f"{w}\t{t}\n" for w, t in rows), encoding="utf-8")
        print(f"{args.out / target}: {len(rows)} sentences")


if __name__ == "__main__":
    main()
