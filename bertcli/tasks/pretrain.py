"""Pretraining: masked language modelling, plus a sentence objective (NSP as in the original
BERT, SOP as in ALBERT, or none).

Sequences are packed from consecutive sentences of a document up to `max_seq_len`, as Google's
create_pretraining_data.py does (with `short_seq_prob` of shorter targets). Sequences are
token ranges into the memory-mapped shards; masks are drawn when a batch is made, from a seed
per (epoch, sequence), so each pass masks differently (dynamic masking) and a resumed or
distributed run masks exactly as a single uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, NamedTuple, Sequence

import numpy as np

from bertcli.data.corpus import Shard
from bertcli.data.sequences import A_END, A_SHARD, A_START, B_END, B_SHARD, B_START, LABEL, sequences
from bertcli.errors import DataError, NonFinite
from bertcli.tasks.base import NON_FINITE, Task, TaskOptions
from bertcli.tokenizer import SPECIAL_TOKENS, WordPieceTokenizer

if TYPE_CHECKING:
    from torch import Tensor, nn


@dataclass(frozen=True)
class PretrainOptions(TaskOptions):
    name: str = "pretrain"
    objective: Literal["nsp", "sop", "none"] = "nsp"  # the sentence objective beside masked language modelling
    mask_prob: float = 0.15  # share of the tokens predicted
    whole_word_mask: bool = False  # mask every piece of a word together
    short_seq_prob: float = 0.1  # share of sequences packed to a shorter, random length
    segmenter: Literal["none", "jieba"] = "none"  # words for Chinese whole-word masking (pip install -e '.[zh]')
    # [CLS] A [SEP] B [SEP] with a few tokens for each sentence
    min_seq_len: ClassVar[int] = 8
    command: ClassVar[str] = "pretrain"
    metrics: ClassVar[tuple[str, ...]] = ("mlm_accuracy", "nsp_accuracy", "sop_accuracy")
    default_headline: ClassVar[tuple[str, ...]] = ("mlm_accuracy",)
    reads_directories: ClassVar[bool] = True

    def problems(self) -> list[str]:
        problems = []
        if not 0 < self.mask_prob < 1:
            problems.append(f"task.mask_prob: must be greater than 0 and less than 1, got {self.mask_prob}")
        if not 0 <= self.short_seq_prob < 1:
            problems.append(f"task.short_seq_prob: must be in [0, 1), got {self.short_seq_prob}")
        return problems

EVAL_SEED = 0  # evaluation's sequences and masks: the same for every run and every evaluation
TOP_K = 5  # candidate tokens predict gives for each [MASK]
MASK = "[MASK]"

class Instance(NamedTuple):
    """One pretraining sequence: a row of `make_instances` and the shards it points into."""

    shards: Sequence[Shard]
    row: np.ndarray


class Instances:
    """A corpus's pretraining sequences, as `PretrainTask.encode` makes them: an (N, 7) array of token
    ranges into its shards, indexed one Instance at a time (an instance is made only when a batch asks)."""

    def __init__(self, shards: Sequence[Shard], rows: np.ndarray):
        self.shards, self.rows = shards, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Instance:
        return Instance(self.shards, self.rows[i])


class PretrainTask(Task):
    """MLM + sentence objective over a corpus's shards. Examples are shards (`read`), features
    pretraining sequences (`encode`); evaluate gives the held-out MLM loss and accuracy, and predict
    fills in the [MASK] tokens of each line with the model's most likely tokens."""

    name = "pretrain"
    architecture = "BertForPreTraining"
    Options = PretrainOptions
    options: PretrainOptions

    def __init__(self, tokenizer: WordPieceTokenizer, options: PretrainOptions, max_seq_len: int,
                 labels: Sequence[str] = ()):
        super().__init__(tokenizer, options, max_seq_len, labels)
        if tokenizer.mask_id is None:
            raise DataError("the tokenizer has no [MASK] token, which pretraining needs")
        self.objective, self.mask_prob, self.whole_word = options.objective, options.mask_prob, options.whole_word_mask
        vocab = tokenizer.backend.get_vocab()
        self.vocab_size = tokenizer.id_limit
        self.continuation = np.zeros(self.vocab_size, dtype=bool)
        for token, i in vocab.items():
            if token.startswith("##") and i < self.vocab_size:
                self.continuation[i] = True
        self.special = np.asarray(sorted(i for t in SPECIAL_TOKENS if (i := tokenizer.backend.token_to_id(t)) is not None))
        self.most_frequent: int | None = None  # the baseline guess of evaluate (set from the training shards)

    @property
    def outputs(self) -> int:
        return self.vocab_size

    def read(self, path: str | Path) -> list[Shard]:
        """The shards of a shard directory, or of a text file (encoded once and cached, corpus.shards_for)."""
        from bertcli.data.corpus import shards_for

        return shards_for([str(path)], self.tokenizer, self.options.segmenter)

    def encode(self, examples: Sequence[Shard], seed: int = EVAL_SEED) -> Instances:
        """The sequences Google's algorithm packs from the shards' documents (`seed` draws the short
        sequences and the NSP/SOP pairs)."""
        return Instances(examples, sequences(examples, self.max_seq_len, self.objective, self.options.short_seq_prob,
                                             seed))

    def lengths(self, instances: Instances) -> np.ndarray:
        rows = instances.rows
        pair = self.objective != "none"
        return (rows[:, A_END] - rows[:, A_START]) + (rows[:, B_END] - rows[:, B_START]) + (3 if pair else 2)

    def _segment(self, shards: Sequence[Shard], shard: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of a segment, and 1 where a token continues the previous token's word:
        from the shard's segmenter when it has one, else WordPiece's '##' pieces."""
        s = shards[shard]
        ids = np.asarray(s.tokens[start:end], dtype=np.int64)
        if len(ids) and ids.max() >= self.vocab_size:  # (the ids are checked as read: a scan would read it all)
            raise DataError(f"shard {shard} of the data: token id {ids.max()} at tokens {start}-{end}, beyond the "
                            f"tokenizer's {self.vocab_size}; encode the text again with this tokenizer")
        if s.continues is not None:
            return ids, np.asarray(s.continues[start:end], dtype=bool) | self.continuation[ids]
        return ids, self.continuation[ids]

    def _sequence(self, instance: Instance) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t, (shards, row) = self.tokenizer, instance
        a, a_cont = self._segment(shards, row[A_SHARD], row[A_START], row[A_END])
        parts, conts, types = [[t.cls_id], a, [t.sep_id]], [[False], a_cont, [False]], [0] * (len(a) + 2)
        if self.objective != "none":
            b, b_cont = self._segment(shards, row[B_SHARD], row[B_START], row[B_END])
            parts += [b, [t.sep_id]]
            conts += [b_cont, [False]]
            types += [1] * (len(b) + 1)
        return (np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]), np.asarray(types, dtype=np.int64),
                np.concatenate([np.asarray(c, dtype=bool) for c in conts]))
    def _mask(self, ids: np.ndarray, continues: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """BERT's masking: mask_prob of the tokens (at least one) are predicted; of those 80%
        become [MASK], 10% a random token and 10% stay. With whole-word masking, a word's
        continuations (or, with a segmenter, the rest of its characters) are chosen with it."""
        labels = np.full_like(ids, -100)
        candidates = np.flatnonzero(~np.isin(ids, self.special))
        if len(candidates) == 0:
            return ids, labels
        budget = max(1, int(round(len(candidates) * self.mask_prob)))
        if self.whole_word:
            # a word starts at a token that is no '##' continuation, or after a special token
            begins = ~continues[candidates] | (np.diff(candidates, prepend=-2) != 1)
            words = np.split(candidates, np.flatnonzero(begins)[1:])
            chosen: list[int] = []
            for w in rng.permutation(len(words)):
                if len(chosen) + len(words[w]) > budget and chosen:
                    continue
                chosen.extend(words[w].tolist())
                if len(chosen) >= budget:
                    break
            picked = np.asarray(sorted(chosen), dtype=np.int64)
        else:
            picked = np.sort(rng.choice(candidates, size=budget, replace=False))
        labels[picked] = ids[picked]
        ids = ids.copy()
        roll = rng.random(len(picked))
        ids[picked[roll < 0.8]] = self.tokenizer.mask_id
        random_positions = picked[(roll >= 0.8) & (roll < 0.9)]
        ids[random_positions] = rng.integers(0, self.vocab_size, size=len(random_positions))
        return ids, labels

    def collate(self, rows: Sequence[Instance], seeds: Sequence[int] | None = None) -> dict[str, Tensor]:
        """A padded batch with its masks drawn: from `seeds`, one per sequence (training: per epoch
        and sequence), else from each sequence's position in the batch."""
        import torch

        seeds = range(len(rows)) if seeds is None else seeds
        seqs = [self._sequence(r) for r in rows]
        width = max(len(ids) for ids, _, _ in seqs)
        batch = {k: torch.full((len(rows), width), v, dtype=torch.long) for k, v in
                 [("input_ids", self.tokenizer.pad_id), ("token_type_ids", 0), ("attention_mask", 0), ("mlm_labels", -100)]}
        for i, ((ids, types, continues), seed) in enumerate(zip(seqs, seeds)):
            masked, labels = self._mask(ids, continues, np.random.default_rng(seed))
            n = len(ids)
            batch["input_ids"][i, :n] = torch.from_numpy(masked)
            batch["token_type_ids"][i, :n] = torch.from_numpy(types)
            batch["attention_mask"][i, :n] = 1
            batch["mlm_labels"][i, :n] = torch.from_numpy(labels)
        batch["sentence_labels"] = torch.as_tensor(np.asarray([int(r.row[LABEL]) for r in rows]), dtype=torch.long)
        batch["mlm_index"] = (batch["mlm_labels"].reshape(-1) != -100).nonzero().squeeze(1)  # on the host: see forward
        return batch

    def counts(self, batch: dict[str, Tensor]) -> dict[str, int]:
        return {"masked": len(batch["mlm_index"]), "sequences": len(batch["sentence_labels"])}

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """MLM logits and their targets at the masked positions, and the sentence logits. The masked
        positions are read through `mlm_index`, computed by collate on the host: no wait for the
        accelerator beyond the trunk's one copy of the masks."""
        index = batch["mlm_index"]
        mlm_logits, sentence_logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                                            mlm_positions=batch["mlm_labels"] != -100, mlm_index=index)
        return mlm_logits.float(), batch["mlm_labels"].reshape(-1).index_select(0, index), sentence_logits.float()

    def loss(self, model: nn.Module, batch: dict[str, Tensor], counts: dict[str, int]) -> Tensor:
        import torch.nn.functional as F

        mlm_logits, targets, sentence_logits = self.forward(model, batch)
        loss = F.cross_entropy(mlm_logits, targets, reduction="sum") / counts["masked"]
        if self.objective != "none":
            loss = loss + F.cross_entropy(sentence_logits, batch["sentence_labels"], reduction="sum") / counts["sequences"]
        return loss

    def evaluate(self, model: nn.Module, examples: Sequence[Shard] | Instances, batch_size: int) -> dict[str, float]:
        """Held-out MLM loss, accuracy and perplexity, the sentence objective's accuracy, and the accuracy of
        always guessing the most frequent training token (of the evaluated text itself where the task did
        not see training shards). Sequences and masks are drawn from fixed seeds: every evaluation of the
        same text masks the same tokens."""
        import torch.nn.functional as F

        instances = examples if isinstance(examples, Instances) else self.encode(examples)
        most_frequent = self.most_frequent
        if most_frequent is None:
            most_frequent = most_frequent_token(instances.shards, self.vocab_size, self.special)
        device = next(model.parameters()).device
        loss_sum = correct = masked = baseline = sentence_correct = 0.0
        for start in range(0, len(instances), batch_size):
            rows = [instances[i] for i in range(start, min(start + batch_size, len(instances)))]
            batch = self.collate(rows, [EVAL_SEED + start + i for i in range(len(rows))])
            batch = {k: v.to(device) for k, v in batch.items()}
            mlm_logits, targets, sentence_logits = self.forward(model, batch)
            scored = (mlm_logits,) if self.objective == "none" else (mlm_logits, sentence_logits)
            if not all(bool(t.isfinite().all()) for t in scored):
                raise NonFinite(NON_FINITE)
            loss_sum += float(F.cross_entropy(mlm_logits, targets, reduction="sum"))
            correct += float((mlm_logits.argmax(-1) == targets).sum())
            baseline += float((targets == most_frequent).sum())
            masked += len(targets)
            sentence_correct += float((sentence_logits.argmax(-1) == batch["sentence_labels"]).sum())
        mlm_loss = loss_sum / max(masked, 1)
        metrics = {"mlm_loss": mlm_loss, "mlm_accuracy": correct / max(masked, 1),
                   "perplexity": float(np.exp(min(mlm_loss, 50.0))), "mlm_baseline_accuracy": baseline / max(masked, 1)}
        if self.objective != "none":
            metrics[f"{self.objective}_accuracy"] = sentence_correct / len(instances)
        return metrics

    def parse_input(self, text: str, where: str) -> str:
        if not text.strip():
            return ""  # a blank line gets the empty answer, as with every task
        if MASK not in text:  # (the tokenizer has the token: the constructor checked)
            raise DataError(f"{where}: no {MASK} in the line: a pretrained model fills in the {MASK} tokens of "
                            f"each line, e.g. 'Paris is the capital of {MASK}.'")
        return text

    def call(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The TOP_K most likely tokens and their probabilities at each [MASK], as (B, T, TOP_K) tensors
        (zero elsewhere): the MLM head runs at the masks alone."""
        import torch

        positions = batch["input_ids"] == self.tokenizer.mask_id
        mlm_logits, _ = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                              mlm_positions=positions)
        k = min(TOP_K, mlm_logits.shape[-1])
        top = mlm_logits.float().softmax(-1).topk(k, dim=-1)
        shape = (*positions.shape, k)
        scores = torch.zeros(shape, device=positions.device)
        ids = torch.zeros(shape, dtype=torch.long, device=positions.device)
        scores[positions], ids[positions] = top.values, top.indices
        return scores, ids

    def predict(self, model: nn.Module, examples: Sequence[str], batch_size: int) -> list[dict]:
        """For each line: the text with every [MASK] replaced by its most likely token, and for each
        [MASK] (in order) the TOP_K most likely tokens with their probabilities (a blank line: no text)."""
        results: list[dict] = [{"text": None, "masks": []} for _ in examples]
        real = [i for i, text in enumerate(examples) if text]
        encodings = self.tokenizer.encode_truncated([examples[i] for i in real], self.max_seq_len)
        outputs = self.run(model, [{"input_ids": e.ids, "token_type_ids": e.type_ids} for e in encodings], batch_size)
        for line, enc, (scores, ids) in zip(real, encodings, outputs):
            text, masks, shift = examples[line], [], 0
            for p in (p for p, token in enumerate(enc.ids) if token == self.tokenizer.mask_id):
                masks.append([{"token": self.tokenizer.backend.id_to_token(int(t)), "score": round(float(s), 6)}
                              for s, t in zip(scores[p], ids[p])])
                start, end = enc.offsets[p]  # the [MASK] in the line, replaced there: the rest stays as written
                best = masks[-1][0]["token"]
                best = best[2:] if best.startswith("##") else best  # a word piece joins the text before it
                text = text[:start + shift] + best + text[end + shift:]
                shift += len(best) - (end - start)
            results[line] = {"text": text, "masks": masks}
            if enc.overflowing:
                results[line]["truncated"] = True  # longer than max_seq_len: masks past it are not filled
        return results


def most_frequent_token(shards: Sequence[Shard], vocab_size: int, special: np.ndarray, limit: int = 50_000_000) -> int:
    """The most frequent non-special token of the training shards (its first `limit` tokens)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    seen, step = 0, 1 << 20  # a million tokens at a time: memory stays flat
    for shard in shards:
        end = min(len(shard.tokens), limit - seen)
        for start in range(0, end, step):
            counts += np.bincount(shard.tokens[start:min(start + step, end)], minlength=vocab_size)[:vocab_size]
        seen += end
        if seen >= limit:
            break
    counts[special] = -1
    return int(counts.argmax())
