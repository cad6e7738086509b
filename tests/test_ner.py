"""NER end to end on a tiny model, readers for each tag scheme, and windows for long inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bertcli.data.conll import read_ner, to_bio
from bertcli.errors import DataError
from bertcli.evaluate import evaluate
from bertcli.jobs import finetune
from bertcli.recipes import load_recipe
from conftest import overflow, write_recipe

CONLL = """-DOCSTART- -X- -X- O

John NNP B-NP B-PER
lives VBZ B-VP O
in IN B-PP O
Paris NNP B-NP B-LOC
. . O O

Mary NNP B-NP B-PER
Smith NNP I-NP I-PER
works VBZ B-VP O
for IN B-PP O
Acme NNP B-NP B-ORG
Corp NNP I-NP I-ORG
in IN B-PP O
London NNP B-NP B-LOC
. . O O

The DT B-NP O
quick JJ I-NP O
fox NN I-NP O
met VBD B-VP O
John NNP B-NP B-PER
near IN B-PP O
Acme NNP B-NP B-ORG
. . O O
"""


def test_tag_schemes_normalise_to_bio():
    assert to_bio(["I-PER", "I-PER", "B-PER", "O"]) == ["B-PER", "I-PER", "B-PER", "O"]  # IOB1
    assert to_bio(["S-LOC", "B-ORG", "I-ORG", "E-ORG"]) == ["B-LOC", "B-ORG", "I-ORG", "I-ORG"]  # BIOES


def test_conll_reader_and_its_errors(tmp_path):
    path = tmp_path / "d.conll"
    path.write_text("\ufeffa\tO\nb\tB-X\n\t\nc\tI-Y\n", encoding="utf-8")  # BOM, a tab-only break (WNUT)
    sentences = read_ner(path)
    assert [s.words for s in sentences] == [("a", "b"), ("c",)]
    assert sentences[1].tags == ("B-Y",)
    path.write_text("a\tO\nb\tX\tO\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d.conll: line 2: 3 columns, but the file's first line has 2"):
        read_ner(path)
    path.write_text("a\tO\nb\tPERSON\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: unknown tag 'PERSON'"):
        read_ner(path)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"tokens": ["Ann", "ran"], "tags": ["S-PER", "O"]}\n{"tokens": ["x"], "tags": []}\n')
    with pytest.raises(DataError, match=r"d.jsonl: line 2: 1 tokens but 0 tags"):
        read_ner(jsonl)


@pytest.fixture(scope="module", params=[32, 8], ids=["one-window", "many-windows"])
def trained(request, tmp_path_factory, tiny_tokenizer_dir):
    d = tmp_path_factory.mktemp("ner")
    (d / "train.conll").write_text(CONLL, encoding="utf-8")
    recipe = write_recipe(d / "recipe.yaml", {"name": "ner"}, {"train": str(d / "train.conll"),
                          "eval": str(d / "train.conll"), "max_seq_len": request.param},
                          {"max_steps": 120, "batch_size": 8, "lr": 3e-3}, tokenizer=tiny_tokenizer_dir)
    metrics = finetune(load_recipe(recipe), d / "run", resume=False, overwrite=False)
    return d, metrics


@pytest.mark.parametrize("name, sentences", [("wnut17/train.conll", 3394), ("wnut17/dev.conll", 1009)])
def test_the_shared_ner_files_read_whole(name, sentences):
    """WNUT-17, which no shipped recipe reads (the CoNLL and MSRA files are read by their recipes' test), with
    its quirks: sentence breaks of a lone tab, and a line holding only a byte-order mark near the end of dev."""
    from conftest import SHARED

    path = SHARED / "data" / name
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    assert len(read_ner(path)) == sentences


def test_tiny_model_overfits_entities(trained):
    d, metrics = trained
    assert metrics["eval_f1"] == 1.0
    m = evaluate(d / "run", d / "train.conll")
    assert m["f1"] == 1.0 and m["entities"] == 7 and set(m["per_type"]) == {"PER", "LOC", "ORG"}
    assert m["precision"] == 1.0 and m["inference_precision"] in ("fp32", "bf16")  # the metric and the run's, apart


@pytest.mark.slow
def test_predict_gives_character_offsets_into_the_line(trained, cli):
    d, _ = trained
    line = "  Mary Smith works for Acme Corp in London ."
    done = cli("predict", str(d / "run"), stdin=(line + "\n\n").encode())
    assert done.returncode == 0, done.stderr
    first, blank = [json.loads(x) for x in done.stdout.decode().splitlines()]
    assert blank == {"entities": []}
    found = [(e["text"], e["label"]) for e in first["entities"]]
    assert found == [("Mary Smith", "PER"), ("Acme Corp", "ORG"), ("London", "LOC")]
    for e in first["entities"]:
        assert line[e["start"]:e["end"]] == e["text"] and 0 < e["score"] <= 1


@pytest.mark.parametrize("line, words", [
    ("P. Simmons won in Chester-le-Street .", ["P.", "Simmons", "won", "in", "Chester-le-Street", "."]),
    ("U.S. officials met H. Morris, (in D.C.) at 3.5%!", ["U.S.", "officials", "met", "H.", "Morris", ",", "(", "in",
                                                         "D.C.", ")", "at", "3.5", "%", "!"]),
    ("李明在北京。", ["李", "明", "在", "北", "京", "。"]),
    ("Chloe\u0301 met Jose\u0301.", ["Chloe\u0301", "met", "Jose\u0301", "."]),
    ('"quoted" ... don\'t', ['"', "quoted", '"', ".", ".", ".", "don't"]),
])
def test_predict_cuts_a_line_into_words_as_conll_and_msra_cut_theirs(line, words, tiny_tokenizer_dir):
    """A tagger learns its tags on the data's words (CoNLL keeps `P.` and `Chester-le-Street` whole, MSRA has a
    word per character): predict cuts a raw line so too, not at every punctuation mark as BERT's pre-tokenizer
    does (that gave `P`, `.`, `Chester`, `-` ... each a word of its own, tagged where no word was in training)."""
    from bertcli.tasks.ner import NerOptions, NerTask
    from bertcli.tokenizer import load_tokenizer

    task = NerTask(load_tokenizer(tiny_tokenizer_dir), NerOptions(), 64, ["O", "B-PER", "I-PER"])
    parsed = task.parse_input(line, "stdin: line 1")
    assert list(parsed.words) == words and all(line[s:e] == w for (s, e), w in zip(parsed.char_spans, words))
    assert task.parse_input(json.dumps({"text": line, "id": 7}), "stdin: line 1").words == parsed.words  # JSON line
    with pytest.raises(DataError, match="a JSON line needs a string field 'text'"):
        task.parse_input('{"sentence": "P. Simmons"}', "stdin: line 1")


def test_a_tagger_whose_outputs_overflow_answers_each_line_with_an_error(trained, tmp_path):
    """Its NaN scores would read as "O" everywhere, an answer of no entities: each line gets an error instead,
    and evaluate scores nothing."""
    import io
    import shutil

    from bertcli import predict

    d, _ = trained
    shutil.copytree(d / "run", tmp_path / "run")
    overflow(tmp_path / "run")
    out = io.StringIO()
    with pytest.raises(DataError, match=r"2 of 2 input line\(s\) could not be read"):
        predict.run(tmp_path / "run", io.BytesIO(b"Mary works in London .\nJohn\n"), "stdin", out, precision="fp32")
    answers = [json.loads(x) for x in out.getvalue().splitlines()]
    assert len(answers) == 2 and all("not a finite number" in a["error"] for a in answers), answers
    with pytest.raises(DataError, match=r"outputs that are not finite numbers"):
        evaluate(tmp_path / "run", d / "train.conll", precision="fp32")


def test_tags_do_not_depend_on_how_many_words_and_windows_go_through_together(trained, monkeypatch):
    """Texts are encoded and tagged a piece of their words at a time, and their windows run a few at a time
    (memory stays flat, however long a text: a CoNLL file without blank lines is one sentence); pieces of 3 words
    and 2 windows give the tags and training features of one piece."""
    from bertcli.jobs import load_for_task
    from bertcli.tasks import ner

    d, _ = trained
    model, task = load_for_task(d / "run")
    model = model.model.eval()
    sentences = task.read(d / "train.conll")
    long = [w for s in sentences for w in s.words] * 3  # one text of 60 words, in several windows at either size
    word_lists = [s.words for s in sentences] + [long]
    whole = task._tag_words(model, word_lists, 8), task.encode(sentences)
    monkeypatch.setattr(ner, "PIECE_WORDS", 3)
    monkeypatch.setattr(ner, "WINDOWS_AT_ONCE", 2)
    run, sizes = task.run, []
    monkeypatch.setattr(task, "run", lambda model, features, size: sizes.append(len(features)) or run(model, features, size))
    pieces = task._tag_words(model, word_lists, 8), task.encode(sentences)
    assert [[t for t, _ in s] for s in whole[0]] == [[t for t, _ in s] for s in pieces[0]]
    assert np.allclose([p for s in whole[0] for _, p in s], [p for s in pieces[0] for _, p in s], rtol=0, atol=1e-6)
    assert max(sizes) <= 2 and len(task._windows(task._pieces([long])[0])) > 2  # (batches of other shapes: 1e-9)
    assert [{k: np.asarray(v).tolist() for k, v in f.items()} for f in whole[1]] == \
        [{k: np.asarray(v).tolist() for k, v in f.items()} for f in pieces[1]]
