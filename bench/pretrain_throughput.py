"""Pretraining throughput: bertcli's training step against Hugging Face BertForPreTraining.

Both train MLM + NSP on the same batches (made by bertcli's pretraining task from real text),
same shapes, sequence length and batch, with AdamW, in fp32 and bf16 autocast; each side's best
precision is compared. Prints one JSON line: tokens/s, model FLOPs utilization against the
measured bf16 matmul peak, and the ratios.

Each measurement runs in a fresh process, and the sides take turns: every round times
transformers with glibc's allocator defaults (what its users get; ratio_best), bertcli (which
keeps freed memory in the process, bertcli/allocator.py) and transformers under that same
malloc policy (ratio_same_allocator), shape after shape. This machine's speed drifts by 10-30%
over minutes, so the figures are each side's median over the rounds, and each round's own
ratios are listed beside them.

The sides do not run the same matmuls: bertcli skips the padding and the positions no loss
reads (matmul_flops). matmul_gflop_per_step gives each side's work on these batches and
work_ratio their quotient: the speed ratio the two would show at equal speed per FLOP, beyond
which bertcli would have to run its smaller matmuls faster than transformers runs its larger
ones. matmul_tflops is each side's rate over the whole step (its work / its step time).

    python bench/pretrain_throughput.py --shapes tiny,6x384,12x768 --precisions bf16

Needs transformers (it comes with the test extra: pip install -e '.[test]').
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_DATA, emit, machine, measured_peak, note  # noqa: E402

from bertcli.allocator import keep_freed_memory  # noqa: E402
from bertcli.data.corpus import load_shards  # noqa: E402
from bertcli.data.encode import encode_corpus  # noqa: E402
from bertcli.fastpath import ROWS  # noqa: E402
from bertcli.model import BertConfig, BertForPreTraining  # noqa: E402
from bertcli.recipes import TrainConfig  # noqa: E402
from bertcli.tasks.pretrain import PretrainOptions, PretrainTask  # noqa: E402
from bertcli.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from bertcli.runtime import autocast  # noqa: E402
from bertcli.train import make_optimizer  # noqa: E402

SHAPES = {"tiny": (2, 128, 2), "6x384": (6, 384, 12), "12x768": (12, 768, 12)}  # layers, hidden, heads
DEFAULT_BATCH = {"tiny": 32, "6x384": 16, "12x768": 8}



def count_parameters(model: torch.nn.Module, exclude_embeddings: bool = True) -> int:
    """Parameters, without the embedding tables when asked (for the FLOPs formula)."""
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters():
        if id(p) in seen or (exclude_embeddings and "embeddings" in name):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def flops_per_token(cfg: BertConfig, seq_len: int, non_embedding_params: int) -> float:
    """Training FLOPs per token: 6 x non-embedding parameters + attention (QK^T and AV)."""
    return 6 * non_embedding_params + 12 * cfg.num_hidden_layers * seq_len * cfg.hidden_size

def corpus_files() -> list[Path]:
    wiki = SHARED_DATA / "corpus" / "wikitext2" / "wiki.valid.raw"
    return [wiki] if wiki.is_file() else [ROOT / "recipes" / "data" / "tiny-corpus.txt"]


def batches(work: Path, seq: int, batch: int, count: int):
    """A tokenizer, shards and `count` batches, kept under `work` for the measuring processes
    (training the tokenizer again could tokenize differently)."""
    files = corpus_files()
    tok = train_tokenizer(files, vocab_size=30522)
    tok.save(work / "tokenizer")
    encode_corpus(tok, files, work / "shards", show_progress=False)
    shards = load_shards(work / "shards", tok)
    task = PretrainTask(tok, PretrainOptions(short_seq_prob=0.0), seq)
    encoded = task.encode(shards, seed=0)
    inst = [encoded[int(i)] for i in torch.randperm(len(encoded), generator=torch.Generator().manual_seed(0))]
    out = [task.collate(inst[i * batch:(i + 1) * batch], list(range(i * batch, (i + 1) * batch)))
           for i in range(count)]
    torch.save(out, work / "batches.pt")
    return tok, task, out


def load_setup(work: Path):
    """What `batches` and `main` kept under `work`: the task, the batches and the model config."""
    tok = load_tokenizer(work / "tokenizer")
    cfg = BertConfig(**json.loads((work / "config.json").read_text()))
    task = PretrainTask(tok, PretrainOptions(), cfg.max_position_embeddings)  # for its loss: the batches are made
    return task, torch.load(work / "batches.pt"), cfg


def matmul_flops(cfg: BertConfig, batch: dict) -> dict[str, int]:
    """Training FLOPs (3 x forward) of the matmuls each side runs on `batch`. transformers runs
    every layer and the MLM head at all B x T positions. bertcli runs its layers at the real
    tokens, its last layer's queries, attention output and FFN at the masked positions and
    [CLS] only, and its MLM head at the masked positions, every row count rounded up to ROWS
    (bertcli/model.py). Both attend over the batch's padded width T. The pooler and the
    sentence head, under 0.1% of either, are left out."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    mask = batch["attention_mask"].bool()
    b, t = mask.shape
    masked = batch["mlm_labels"] != -100
    needed = (masked | (torch.arange(t) == 0)) & mask
    up = lambda n: -(-n // ROWS) * ROWS  # noqa: E731
    real, selected, queries = up(int(mask.sum())), up(int(needed.sum())), int(needed.sum(1).max())
    qkvo, ffn = 2 * 4 * h * h, 2 * 2 * h * i  # per token
    attention = lambda rows: 2 * 2 * b * rows * t * h  # noqa: E731  QK^T and AV, per layer
    head = lambda rows: rows * 2 * (h * h + h * v)  # noqa: E731  transform and decoder
    layers = cfg.num_hidden_layers
    hf = layers * (b * t * (qkvo + ffn) + attention(t)) + head(b * t)
    ours = ((layers - 1) * (real * (qkvo + ffn) + attention(t)) + real * qkvo // 2 + selected * (qkvo // 2 + ffn)
            + attention(queries) + head(up(int(masked.sum()))))
    return {"bertcli": 3 * ours, "transformers": 3 * hf}


def time_steps(step, data, warmup: int) -> tuple[float, float]:
    """Tokens/s over the steps after `warmup`, and the minor page faults per timed step: memory
    handed back to the kernel and faulted in again, or the heap still growing."""
    for b in data[:warmup]:
        step(b)
    tokens, faults, start = 0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for b in data[warmup:]:
        step(b)
        tokens += int(b["attention_mask"].sum())
    seconds = time.perf_counter() - start
    return tokens / seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (len(data) - warmup)


def profile(step, data, warmup: int) -> dict[str, float]:
    """Share of CPU time per operator (self time) over the timed steps; the table goes to stderr."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for b in data[:warmup]:
        step(b)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in data[warmup:]:
            step(b)
    events = prof.key_averages()
    note(events.table(sort_by="self_cpu_time_total", row_limit=20))
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:20]
    return {e.key: round(e.self_cpu_time_total / total, 4) for e in top}


def bertcli_step(cfg: BertConfig, task: PretrainTask, precision: str):
    torch.manual_seed(0)
    model = BertForPreTraining(cfg).train()
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4))
    device = torch.device("cpu")

    def step(batch):
        with autocast(device, precision):
            loss = task.loss(model, batch, task.counts(batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model


def hf_step(cfg: BertConfig, precision: str):
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                     num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                                     intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings)
    model = transformers.BertForPreTraining(hf_cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def step(batch):
        with autocast(torch.device("cpu"), precision):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        token_type_ids=batch["token_type_ids"], labels=batch["mlm_labels"],
                        next_sentence_label=batch["sentence_labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


SIDES = ("transformers", "bertcli", "transformers_kept_memory")


def measure(args: argparse.Namespace) -> None:
    """One side, one shape, one precision, in this (fresh) process: prints tokens/s and faults."""
    task, data, cfg = load_setup(Path(args.measure))
    policy = keep_freed_memory() if args.side != "transformers" else False
    if args.side == "bertcli":
        step = bertcli_step(cfg, task, args.precisions)[0]
    else:
        step = hf_step(cfg, args.precisions)
    tokens_per_s, faults = time_steps(step, data, args.warmup)
    emit({"tokens_per_s": tokens_per_s, "minor_faults_per_step": faults, "kept_freed_memory": policy})


def measure_in_new_process(side: str, work: Path, precision: str, warmup: int) -> dict:
    command = [sys.executable, __file__, "--measure", str(work), "--side", side, "--precisions", precision,
               "--warmup", str(warmup)]
    done = subprocess.run(command, stdout=subprocess.PIPE, check=True)
    return json.loads(done.stdout.decode().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,6x384,12x768", help="comma-separated: tiny, 6x384, 12x768")
    parser.add_argument("--seq", type=int, default=128, help="sequence length")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 32 / 16 / 8 by shape)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=20,
                        help="untimed steps first, for the heap to grow to the step's needs (see minor_faults_per_step)")
    parser.add_argument("--rounds", type=int, default=3, help="turns each side takes at every shape and precision")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing, profile bertcli's step (last of --precisions) per operator")
    parser.add_argument("--measure", metavar="DIR", help=argparse.SUPPRESS)  # one measurement, run by main itself
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args)
        return

    peak_bf16 = measured_peak(torch.bfloat16)
    peak_fp32 = measured_peak(torch.float32)
    note(f"measured peak: bf16 {peak_bf16 / 1e12:.2f} TFLOP/s, fp32 {peak_fp32 / 1e12:.2f} TFLOP/s")
    result = {"bench": "pretrain_throughput", "machine": machine(), "seq": args.seq, "rounds": args.rounds,
              "peak_tflops": {"bf16": peak_bf16 / 1e12, "fp32": peak_fp32 / 1e12}, "shapes": {}}
    shapes = args.shapes.split(",")
    precisions = args.precisions.split(",")
    with tempfile.TemporaryDirectory() as work:
        setups = {}
        for shape in shapes:
            layers, hidden, heads = SHAPES[shape]
            batch = args.batch or DEFAULT_BATCH[shape]
            tok, task, data = batches(Path(work) / shape, args.seq, batch, args.warmup + args.steps)
            cfg = BertConfig(vocab_size=max(tok.vocab_size, 30522), hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, intermediate_size=4 * hidden)
            (Path(work) / shape / "config.json").write_text(json.dumps(asdict(cfg)))
            setups[shape] = (batch, task, data, cfg)
        if args.profile:
            keep_freed_memory()
            for shape, (batch, task, data, cfg) in setups.items():
                step, _ = bertcli_step(cfg, task, precisions[-1])
                result["shapes"][shape] = {"batch": batch, "cpu_time_share": profile(step, data, args.warmup)}
            emit(result)
            return
        runs = {shape: {side: {p: [] for p in precisions} for side in SIDES} for shape in shapes}
        for turn in range(args.rounds):
            for shape in shapes:
                for precision in precisions:
                    for side in SIDES:
                        run = measure_in_new_process(side, Path(work) / shape, precision, args.warmup)
                        runs[shape][side][precision].append(run)
                        note(f"round {turn + 1}, {shape} {precision}: {side} {run['tokens_per_s']:.0f} tok/s, "
                             f"{run['minor_faults_per_step']:.0f} faults/step")
        for shape, (batch, task, data, cfg) in setups.items():
            row = {"batch": batch}
            for side in SIDES:
                row[side] = {p: statistics.median(r["tokens_per_s"] for r in runs[shape][side][p]) for p in precisions}
            row["minor_faults_per_step"] = {
                side: {p: statistics.median(r["minor_faults_per_step"] for r in runs[shape][side][p]) for p in precisions}
                for side in SIDES}
            best = {side: max(precisions, key=lambda p: row[side][p]) for side in SIDES}
            per_round = {side: [r["tokens_per_s"] for r in runs[shape][side][best[side]]] for side in SIDES}
            fpt = flops_per_token(cfg, args.seq, count_parameters(BertForPreTraining(cfg)))
            row["ratio_best"] = row["bertcli"][best["bertcli"]] / row["transformers"][best["transformers"]]
            row["ratio_same_allocator"] = (row["bertcli"][best["bertcli"]]
                                           / row["transformers_kept_memory"][best["transformers_kept_memory"]])
            row["ratio_best_by_round"] = [a / b for a, b in zip(per_round["bertcli"], per_round["transformers"])]
            row["ratio_same_allocator_by_round"] = [a / b for a, b in zip(per_round["bertcli"],
                                                                           per_round["transformers_kept_memory"])]
            timed = data[args.warmup:]
            real = sum(int(b["attention_mask"].sum()) for b in timed)
            work = {side: sum(matmul_flops(cfg, b)[side] for b in timed) / real for side in ("bertcli", "transformers")}
            row["matmul_gflop_per_step"] = {side: work[side] * real / len(timed) / 1e9 for side in work}
            row["work_ratio"] = work["transformers"] / work["bertcli"]
            model_of = {"bertcli": "bertcli", "transformers": "transformers", "transformers_kept_memory": "transformers"}
            row["matmul_tflops"] = {side: row[side][best[side]] * work[model_of[side]] / 1e12 for side in SIDES}
            row["mfu_bertcli"] = row["bertcli"][best["bertcli"]] * fpt / peak_bf16
            row["mfu_transformers"] = row["transformers"][best["transformers"]] * fpt / peak_bf16
            result["shapes"][shape] = row
    emit(result)


if __name__ == "__main__":
    main()
