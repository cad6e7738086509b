"""Extractive QA data: SQuAD v1.1 / v2.0 JSON (CMRC 2018 uses the same layout) and JSONL.

An answer whose `answer_start` does not point at its text is re-located at the occurrence of
the text nearest to the given start. One whose text is not in the context at all (about 2% of
CMRC 2018's) cannot be trained on, but still counts as a gold answer when scoring, as in the
official evaluation; both are counted for the caller to report. More than 5% of the answered
questions with no answer in their context means a broken file: that stops with a DataError (an
alternative answer missing while another is found is only counted)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bertcli.data.tables import read_jsonl, read_text
from bertcli.errors import DataError
from bertcli.textio import load_json, split_lines


MAX_UNLOCATED = 0.05  # CMRC 2018 dev has 2.0% of answers absent from their context; far more means a broken file


@dataclass(frozen=True)
class QaExample:
    id: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]  # located answers: (text, character start in context)
    is_impossible: bool = False
    where: str = ""
    gold: tuple[str, ...] = ()  # every gold answer text, located or not (what scoring compares with)


@dataclass
class ReadReport:
    answers: int = 0  # gold answers read
    relocated: int = 0  # answer starts moved to where their text is
    unlocated: list[str] = field(default_factory=list)  # answers whose text is not in the context
    questions: int = 0  # questions with answers given
    lost: int = 0  # of those, questions none of whose answers is in the context


def _locate(context: str, text: str, start: Any) -> int | None:
    """The start of `text` in `context`: the given one when right, else the nearest occurrence."""
    if isinstance(start, int) and not isinstance(start, bool) and context[start:start + len(text)] == text:
        return start
    hits, i = [], context.find(text)
    while i >= 0:
        hits.append(i)
        i = context.find(text, i + 1)
    if not hits:
        return None
    given = start if isinstance(start, int) and not isinstance(start, bool) else 0
    return min(hits, key=lambda h: abs(h - given))


def _answers(raw: Any, where: str) -> list[tuple[str, Any]]:
    if raw is None:
        return []
    if isinstance(raw, dict):  # Hugging Face datasets layout {"text": [...], "answer_start": [...]}
        texts, starts = raw.get("text"), raw.get("answer_start")
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise DataError(f"{where}: 'answers' needs lists 'text' and 'answer_start' of equal length")
        return list(zip(texts, starts))
    if not isinstance(raw, list):
        raise DataError(f"{where}: 'answers' must be a list")
    out = []
    for a in raw:
        if not isinstance(a, dict) or "text" not in a:
            raise DataError(f"{where}: each answer needs a 'text' field")
        out.append((a["text"], a.get("answer_start")))
    return out


def _example(qa: Any, context: str, where: str, report: ReadReport) -> QaExample:
    if not isinstance(qa, dict):
        raise DataError(f"{where}: expected a question object")
    question = qa.get("question")
    if not isinstance(question, str):
        raise DataError(f"{where}: missing field 'question'")
    qid = str(qa.get("id", where))
    given = _answers(qa.get("answers"), where)
    # Hugging Face's SQuAD v2 layout marks a question without an answer by empty answer lists alone
    impossible = qa.get("is_impossible", isinstance(qa.get("answers"), dict) and not given)
    if not isinstance(impossible, bool):  # "false" is a string, and bool("false") is True
        raise DataError(f"{where} (id {qid}): 'is_impossible' must be true or false, got {impossible!r}")
    answers = []
    if impossible and given:
        raise DataError(f"{where} (id {qid}): 'is_impossible' is true, but it has answers (SQuAD v2 keeps those of a "
                        "question without an answer as 'plausible_answers')")
    for text, start in given:
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where} (id {qid}): an answer text must be a non-empty string")
        if start == -1 and not isinstance(start, bool):
            start = None  # CMRC 2018's mark of a start it does not know (193 of its dev answers): found by the text
        if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
            raise DataError(f"{where} (id {qid}): 'answer_start' must be a character offset of 0 or more (or -1: "
                            f"unknown), got {start!r}")
        report.answers += 1
        found = _locate(context, text, start)
        if found is None:
            report.unlocated.append(f"{where} (id {qid}): answer {text[:40]!r} is not in the context")
            continue
        if found != start:
            report.relocated += 1
        answers.append((text, found))
    if not given and not impossible:
        raise DataError(f"{where}: question {qid!r} has no answers (and is not marked is_impossible)")
    if given:
        report.questions += 1
        report.lost += not answers
    return QaExample(qid, question.strip(), context, tuple(answers), impossible or not given, where,
                     tuple(text for text, _ in given))


def read_squad(path: str | Path) -> tuple[list[QaExample], ReadReport]:
    examples, report = _read_squad(path)
    if report.lost > MAX_UNLOCATED * report.questions:
        shown = "; ".join(report.unlocated[:3])
        raise DataError(f"{path}: {report.lost} of {report.questions} questions have no answer in their context "
                        f"(more than {MAX_UNLOCATED:.0%}: are the contexts and answers from the same file?): {shown}")
    return examples, report


def _question_first(text: str) -> bool:
    """Whether the first line of `text` is a JSON object with a question: a JSON line, not a SQuAD file."""
    first = next((line for line in split_lines(text) if line.strip()), "")
    try:
        row = load_json(first)
    except (ValueError, RecursionError):
        return False
    return isinstance(row, dict) and "question" in row


def _read_squad(path: str | Path) -> tuple[list[QaExample], ReadReport]:
    suffix = Path(path).suffix.lower()
    text = read_text(path, one_example_per_line=suffix == ".jsonl")
    report = ReadReport()
    examples: list[QaExample] = []
    if suffix == ".jsonl" or (not suffix and _question_first(text)):  # a pipe of JSON lines too
        for number, row in read_jsonl(path, text):
            where = f"{path}: line {number}"
            if not isinstance(row.get("context"), str):
                raise DataError(f"{where}: missing field 'context'")
            examples.append(_example(row, row["context"], where, report))
        return examples, report
    try:
        doc = load_json(text)
    except (ValueError, RecursionError) as err:
        raise DataError(f"{path}: cannot be read as JSON ({err})") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected SQuAD JSON with a top-level 'data' list")
    for a, article in enumerate(data):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise DataError(f"{path}: data[{a}]: missing field 'paragraphs'")
        for p, paragraph in enumerate(paragraphs):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            if not isinstance(context, str):
                raise DataError(f"{where}: missing field 'context'")
            if not isinstance(qas, list):
                raise DataError(f"{where}: missing field 'qas'")
            for q, qa in enumerate(qas):
                examples.append(_example(qa, context, f"{where}.qas[{q}]", report))
    if not examples:
        raise DataError(f"{path}: no questions")
    return examples, report
