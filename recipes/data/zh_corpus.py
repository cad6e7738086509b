"""Writes unlabelled Chinese text for recipes/pretrain-zh.yaml from the *training* parts of the
Chinese data sets (ChnSentiCorp train, MSRA NER train, the CMRC 2018 file used for training):
one document per review / sentence group / paragraph, blank lines between. Evaluation files
are not read. The text stays on your machine (the data sets' terms forbid redistribution).

    python recipes/data/zh_corpus.py --data ../shared/data --out runs/zh-corpus.txt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def chnsenticorp(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t", 1)[1].strip() for line in lines if "\t" in line]


def msra(path: Path, group: int = 8) -> list[str]:
    sentences, chars = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            chars.append(line.split("\t")[0])
        elif chars:
            sentences.append("".join(chars))
            chars = []
    if chars:
        sentences.append("".join(chars))
    return ["\n".join(sentences[i:i + group]) for i in range(0, len(sentences), group)]


def cmrc(path: Path) -> list[str]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    seen, out = set(), []
    for article in doc["data"]:
        for paragraph in article["paragraphs"]:
            if paragraph["context"] not in seen:
                seen.add(paragraph["context"])
                out.append(paragraph["context"].strip())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/zh-corpus.txt"))
    args = parser.parse_args()
    docs = (chnsenticorp(args.data / "chnsenticorp" / "train.tsv") + msra(args.data / "msra_ner" / "train.txt")
            + cmrc(args.data / "cmrc2018" / "cmrc2018_dev.json"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n\n".join(d for d in docs if d) + "\n", encoding="utf-8")
    print(f"{len(docs)} documents, {sum(len(d) for d in docs)} characters -> {args.out}")


if __name__ == "__main__":
    main()
