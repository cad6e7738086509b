"""Pretraining throughput: bertcli's training step against Hugging Face BertForPreTraining.

Both train MLM + NSP on the same batches (made by bertcli's pretraining task from real text),
same shapes, sequence length and batch, with AdamW, one after the other in this process, in
fp32 and bf16 autocast; each side's best precision is compared. Prints one JSON line: tokens/s,
model FLOPs utilization against the measured bf16 matmul peak, and the ratios.

bertcli's training keeps freed memory in the process (bertcli/allocator.py), a process-wide
malloc policy that cannot be undone. So transformers is timed first with glibc's defaults
(ratio_best), then bertcli and transformers again under bertcli's policy (ratio_same_allocator),
all in this one run.

    python bench/pretrain_throughput.py --shapes tiny,6x384,12x768

Needs transformers (it comes with the test extra: pip install -e '.[test]').
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_DATA, emit, machine, measured_peak, note  # noqa: E402

from bertcli.allocator import keep_freed_memory  # noqa: E402
from bertcli.data.corpus import encode_corpus, load_shards  # noqa: E402
from bertcli.model import BertConfig, BertForPreTraining, count_parameters, flops_per_token  # noqa: E402
from bertcli.recipes import TrainConfig  # noqa: E402
from bertcli.tasks.pretrain import PretrainTask, make_instances  # noqa: E402
from bertcli.tokenizer import train_tokenizer  # noqa: E402
from bertcli.train import autocast, make_optimizer  # noqa: E402

SHAPES = {"tiny": (2, 128, 2), "6x384": (6, 384, 12), "12x768": (12, 768, 12)}  # layers, hidden, heads
DEFAULT_BATCH = {"tiny": 32, "6x384": 16, "12x768": 8}


def corpus_files() -> list[Path]:
    wiki = SHARED_DATA / "corpus" / "wikitext2" / "wiki.valid.raw"
    return [wiki] if wiki.is_file() else [ROOT / "recipes" / "data" / "tiny-corpus.txt"]


def batches(work: Path, seq: int, batch: int, count: int):
    files = corpus_files()
    tok = train_tokenizer(files, vocab_size=30522)
    encode_corpus(tok, files, work / "shards", show_progress=False)
    shards = load_shards(work / "shards", tok)
    task = PretrainTask(tok, shards, "nsp")
    inst = make_instances(shards, seq, "nsp", 0.0, seed=0)
    inst = inst[torch.randperm(len(inst), generator=torch.Generator().manual_seed(0)).numpy()]
    out = [task.collate(list(inst[i * batch:(i + 1) * batch]), list(range(i * batch, (i + 1) * batch)))
           for i in range(count)]
    return tok, task, out


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,6x384,12x768", help="comma-separated: tiny, 6x384, 12x768")
    parser.add_argument("--seq", type=int, default=128, help="sequence length")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 32 / 16 / 8 by shape)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=20,
                        help="untimed steps first, for the heap to grow to the step's needs (see minor_faults_per_step)")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing, profile bertcli's step (last of --precisions) per operator")
    args = parser.parse_args()

    peak_bf16 = measured_peak(torch.bfloat16)
    peak_fp32 = measured_peak(torch.float32)
    note(f"measured peak: bf16 {peak_bf16 / 1e12:.2f} TFLOP/s, fp32 {peak_fp32 / 1e12:.2f} TFLOP/s")
    result = {"bench": "pretrain_throughput", "machine": machine(), "seq": args.seq,
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
            setups[shape] = (batch, task, data, cfg)
        if args.profile:
            keep_freed_memory()
            for shape, (batch, task, data, cfg) in setups.items():
                step, _ = bertcli_step(cfg, task, precisions[-1])
                result["shapes"][shape] = {"batch": batch, "cpu_time_share": profile(step, data, args.warmup)}
            emit(result)
            return
        # glibc's allocator policy is process-wide and cannot be undone: transformers first with the
        # defaults every user gets, then both sides under the policy bertcli's training sets.
        sides = ("bertcli", "transformers", "transformers_kept_memory")
        rows = {shape: {"batch": setup[0], **{side: {} for side in sides}, "minor_faults_per_step": {side: {} for side in sides}}
                for shape, setup in setups.items()}

        def run(side: str, make_step) -> None:
            for shape, (batch, task, data, cfg) in setups.items():
                for precision in precisions:
                    row = rows[shape]
                    row[side][precision], row["minor_faults_per_step"][side][precision] = \
                        time_steps(make_step(cfg, task, precision), data, args.warmup)
                    note(f"{shape} {precision}: {side} {row[side][precision]:.0f} tok/s")

        run("transformers", lambda cfg, task, precision: hf_step(cfg, precision))
        result["kept_freed_memory"] = keep_freed_memory()
        run("bertcli", lambda cfg, task, precision: bertcli_step(cfg, task, precision)[0])
        run("transformers_kept_memory", lambda cfg, task, precision: hf_step(cfg, precision))
        for shape, (batch, task, data, cfg) in setups.items():
            row = rows[shape]
            fpt = flops_per_token(cfg, args.seq, count_parameters(BertForPreTraining(cfg)))
            best_ours = max(row["bertcli"].values())
            best_theirs = max(row["transformers"].values())
            row["ratio_best"] = best_ours / best_theirs
            row["ratio_same_allocator"] = best_ours / max(row["transformers_kept_memory"].values())
            row["mfu_bertcli"] = best_ours * fpt / peak_bf16
            row["mfu_transformers"] = best_theirs * fpt / peak_bf16
            result["shapes"][shape] = row
    emit(result)


if __name__ == "__main__":
    main()
