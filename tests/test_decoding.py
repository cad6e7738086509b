"""Decoding checked apart from encoding: a stand-in model that knows the answer from the token ids
alone (not from the task's own encoded labels), run on texts no model was trained on, with windows
small enough that every text spans several. A shared off-by-one in encoding and decoding, which an
overfit test would not see, shows here as a wrong entity, answer or offset."""

from __future__ import annotations

import torch
from torch import nn

from bertcli.model import SpanLogits
from bertcli.tasks.ner import NerOptions, NerTask
from bertcli.tasks.qa import QaOptions, QaTask
from bertcli.tokenizer import load_tokenizer

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


class Oracle(nn.Module):
    """Logits from the input ids alone: `scores[id]` (one row per id; the rest of the ids score 0)."""

    def __init__(self, scores: dict[int, list[float]], width: int):
        super().__init__()
        self.scores, self.width = scores, width
        self.anchor = nn.Parameter(torch.zeros(1))  # a device for the task to read

    def table(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*ids.shape, self.width)
        for index, token in enumerate(ids.reshape(-1).tolist()):
            if token in self.scores:
                out.view(-1, self.width)[index] = torch.tensor(self.scores[token])
        return out


class TagOracle(Oracle):
    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.table(input_ids)  # (B, T, tags)


class SpanOracle(Oracle):
    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        start, end = self.table(input_ids).unbind(-1)
        return SpanLogits(start, end)


def one_hot(index: int, width: int, high: float = 9.0) -> list[float]:
    return [high if i == index else 0.0 for i in range(width)]


def test_ner_offsets_and_entities_on_unseen_text_across_windows(minilm_dir):
    tok = load_tokenizer(minilm_dir)
    words = {"john": "B-PER", "smith": "I-PER", "paris": "B-LOC", "london": "B-LOC"}
    ids = {tok.backend.token_to_id(w): tag for w, tag in words.items()}
    assert None not in ids  # each word is one token of the vocabulary
    scores = {i: one_hot(TAGS.index(tag), len(TAGS)) for i, tag in ids.items()}  # every other token: O
    task = NerTask(tok, NerOptions(), 8, TAGS)  # windows of 6 tokens, 3 apart
    texts = ["Yesterday John Smith flew from London to Paris, said john.",
             "Paris!", "Nobody here.", "  John   Smith  "]
    examples = [task.parse_input(t, f"line {n}") for n, t in enumerate(texts, 1)]
    answers = task.predict(TagOracle(scores, len(TAGS)), examples, batch_size=3)
    found = [[(e["text"], e["label"], t[e["start"]:e["end"]]) for e in a["entities"]] for t, a in zip(texts, answers)]
    assert found == [
        [("John Smith", "PER", "John Smith"), ("London", "LOC", "London"), ("Paris", "LOC", "Paris"),
         ("john", "PER", "john")],
        [("Paris", "LOC", "Paris")],
        [],
        [("John   Smith", "PER", "John   Smith")],
    ]


def test_qa_answer_offsets_on_unseen_contexts_across_windows(minilm_dir):
    tok = load_tokenizer(minilm_dir)
    first, last = tok.backend.token_to_id("denver"), tok.backend.token_to_id("broncos")
    scores = {first: [9.0, 0.0], last: [0.0, 9.0]}
    task = QaTask(tok, QaOptions(doc_stride=3, max_query_len=4, max_answer_len=5), 16)  # 9 context tokens a window
    contexts = ["In the final game of the season the Denver Broncos beat the Carolina Panthers by ten points.",
                "Denver Broncos.", "The team that won was, after a long and strange season, the Denver Broncos!"]
    examples = [task.parse_input(f'{{"question": "Who won?", "context": "{c}"}}', f"line {n}")
                for n, c in enumerate(contexts, 1)]
    answers = task.predict(SpanOracle(scores, 2), examples, batch_size=4)
    for context, answer in zip(contexts, answers):
        assert answer["answer"] == "Denver Broncos" and "truncated" not in answer
        assert context[answer["start"]:answer["end"]] == "Denver Broncos"
    long = task.parse_input(f'{{"question": "Who won the game, in the end?", "context": "{contexts[1]}"}}', "line 4")
    [answer] = task.predict(SpanOracle(scores, 2), [long], batch_size=4)  # read on its first 4 tokens, and said
    assert (answer["answer"], answer["start"], answer["truncated"]) == ("Denver Broncos", 0, True)
