from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from bertcli.errors import CheckpointError, DataError
from bertcli.tokenizer import load_tokenizer, train_tokenizer
from conftest import CORPUS, run_cli


def test_trained_tokenizer_is_bert_shaped(tiny_tokenizer_dir):
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tiny_tokenizer_dir / name).is_file()
    tok = load_tokenizer(tiny_tokenizer_dir)
    enc = tok.encode("The QUICK fox")
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    assert "quick" in enc.tokens  # uncased by default
    assert tok.encode("北京").tokens == ["[CLS]", "北", "京", "[SEP]"]  # CJK split one per token
    pair = tok.encode("hello", "world")
    assert pair.type_ids[-1] == 1 and pair.tokens.count("[SEP]") == 2


def test_offsets_point_into_the_original_text(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    text = "  Hello   world"
    enc = tok.encode(text)
    words = [text[a:b] for (a, b), t in zip(enc.offsets, enc.tokens) if t not in ("[CLS]", "[SEP]")]
    assert "".join(words).lower() == "helloworld"


def test_plain_tokenizers_loads_the_file(tiny_tokenizer_dir):
    raw = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    assert raw.encode("hello world").tokens[0] == "[CLS]"
    vocab = (tiny_tokenizer_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text())["do_lower_case"] is True


def test_cased_keeps_case(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS * 3, encoding="utf-8")
    tok = train_tokenizer([corpus], vocab_size=300, lowercase=False, min_frequency=1)
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again.lowercase is False
    assert "The" in again.encode("The").tokens


def test_vocab_txt_only_directory_loads(tiny_tokenizer_dir, tmp_path):
    (tmp_path / "vocab.txt").write_text((tiny_tokenizer_dir / "vocab.txt").read_text(encoding="utf-8"), encoding="utf-8")
    a = load_tokenizer(tiny_tokenizer_dir).encode("the quick brown fox jumps")
    b = load_tokenizer(tmp_path).encode("the quick brown fox jumps")
    assert a.ids == b.ids


def test_special_tokens_written_in_the_text_are_read_whole_as_transformers_reads_them(tiny_tokenizer_dir,
                                                                                      tmp_path):
    """A checkpoint laid out as bert-base-chinese is (vocab.txt alone, here also with a byte-order mark) reads
    `[MASK]` in a line as the mask token, as transformers does, and so does a run that saved such a tokenizer
    without its special tokens; `[mask]`, lower case, is text."""
    text = "hello [SEP] world [MASK] [mask] 北京[MASK]都"
    mine = load_tokenizer(tiny_tokenizer_dir)
    want = mine.encode(text).ids
    assert want.count(mine.backend.token_to_id("[MASK]")) == 2 and want.count(mine.sep_id) == 2
    vocab = (tiny_tokenizer_dir / "vocab.txt").read_text(encoding="utf-8")
    saved = json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    for name, files in {"plain": {"vocab.txt": vocab}, "bom": {"vocab.txt": "\ufeff" + vocab},
                        "saved": {"tokenizer.json": json.dumps({**saved, "added_tokens": []})}}.items():
        for file, content in files.items():
            (tmp_path / name).mkdir()
            (tmp_path / name / file).write_text(content, encoding="utf-8")
        assert load_tokenizer(tmp_path / name).encode(text).ids == want, name
    transformers = pytest.importorskip("transformers")
    assert transformers.BertTokenizer(str(tmp_path / "plain" / "vocab.txt")).encode(text) == want


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        train_tokenizer([tmp_path / "missing.txt"])
    for text in ("", "\n \n\t\n"):  # a vocabulary of the special tokens alone would read every word as [UNK]
        (tmp_path / "empty.txt").write_text(text, encoding="utf-8")
        with pytest.raises(DataError, match="no text to learn a vocabulary from"):
            train_tokenizer([tmp_path / "empty.txt"], vocab_size=100)
    with pytest.raises(CheckpointError, match="no tokenizer.json or vocab.txt"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_tokenize_train_names_the_line_and_byte_of_text_that_is_not_utf8(tmp_path):
    from bertcli.data.corpus import spooled

    (tmp_path / "bad.txt").write_bytes(b"good line\nanother good one\nbad \xff byte here\nmore\n")
    for args, stdin in (([str(tmp_path / "bad.txt")], b""), (["/dev/stdin"], (tmp_path / "bad.txt").read_bytes())):
        done = run_cli("tokenize", "train", "--corpus", *args, "--out", str(tmp_path / "tok"), "--vocab-size", "100",
                       stdin=stdin)
        assert done.returncode == 2 and b"line 3: not UTF-8 text (byte offset 31)" in done.stderr, done.stderr
        assert not (tmp_path / "tok").exists()
    # a character cut by the 1 MiB pieces the check reads, on a line or across lines, is whole text
    (tmp_path / "long.txt").write_text("a" * ((1 << 20) - 1) + "é\n" + "b\n" * 9 + "c" * (1 << 20) + "ü", encoding="utf-8")
    with spooled([tmp_path / "long.txt"], scan=True) as files:
        assert files == [tmp_path / "long.txt"]


def test_a_long_text_cut_to_its_first_tokens_is_encoded_from_its_start_with_the_same_ids(tiny_tokenizer_dir,
                                                                                         monkeypatch):
    """classify reads a text's first max_seq_len tokens: a line of a megabyte is encoded from a start of it cut where
    a word ends, with the ids, offsets and overflow flag the whole text gives; also where the start must grow (long
    words, characters the normalizer drops, no white space) or the cut falls in a word's accents."""
    import random

    from bertcli import tokenizer as module

    tok = load_tokenizer(tiny_tokenizer_dir)
    rng = random.Random(0)
    words = CORPUS.split() + ["北京", "\x00\x01" * 50, "x" * 300, "Jose\u0301", "[MASK]", "\u200b", "e\u0301\u0301"]
    spaces = [" ", " ", "\t", "\x0c", "\x85", "\u00a0", "\u3000", ""]  # \x0c and \x85: dropped, not white space
    texts = ["".join(rng.choice(words) + rng.choice(spaces) for _ in range(rng.randint(1, 3000))) for _ in range(40)]
    texts += ["北京大学" * 2000, "\x00" * 5000 + " the fox", "a" * 100_000, " " * 5000 + "the fox " * 50]
    start, cut, chars = tok._start, [], module.CHARS_PER_TOKEN
    monkeypatch.setattr(tok, "_start", lambda text, max_len: cut.append(len(start(text, max_len)) < len(text)) or
                        start(text, max_len))
    for max_len in (8, 32):
        mine = tok.encode_truncated(texts, max_len)
        monkeypatch.setattr(module, "CHARS_PER_TOKEN", 10**9)  # no start: each whole text encoded
        whole = tok.encode_truncated(texts, max_len)
        monkeypatch.setattr(module, "CHARS_PER_TOKEN", chars)
        assert [e.ids for e in mine] == [e.ids for e in whole]
        assert [e.offsets for e in mine] == [e.offsets for e in whole]
        assert [bool(e.overflowing) for e in mine] == [bool(e.overflowing) for e in whole]
        assert sum(bool(e.overflowing) for e in whole) > 30
    assert sum(cut) > 70  # most long texts were encoded from a start of them (44 texts at each max_len)


def test_a_text_pair_is_cut_as_tokenizers_cuts_it(tiny_tokenizer_dir):
    """Pairs are cut by bertcli (tokenizers makes every combination of both texts' overflow windows: 20 s for one
    long pair), to the ids, token types and overflow flag of tokenizers' own longest_first truncation."""
    import random

    tok = load_tokenizer(tiny_tokenizer_dir)
    rng = random.Random(0)
    words = CORPUS.split()[:30] + ["北京", "Jose\u0301", "[MASK]", "x" * 150]
    pairs = [tuple(" ".join(rng.choice(words) for _ in range(rng.randint(0, 15))) for _ in "ab") for _ in range(300)]
    for max_len in range(4, 14):
        tok.backend.enable_truncation(max_len)
        want = tok.backend.encode_batch(pairs)
        tok.backend.no_truncation()
        got = tok.encode_truncated(pairs, max_len)
        expected = [(w.ids, w.type_ids, bool(w.overflowing)) for w in want]
        assert [(g.ids, g.type_ids, g.overflowing) for g in got] == expected
    assert sum(g.overflowing for g in got) > 50 and sum(not g.overflowing for g in got) > 50


def load_tokenizer_from(backend: Tokenizer):
    from bertcli.tokenizer import WordPieceTokenizer

    return WordPieceTokenizer(backend, True)


def test_long_texts_encoded_in_pieces_give_the_tokens_and_offsets_of_one_encoding(tiny_tokenizer_dir, monkeypatch):
    """QA's contexts are encoded a piece at a time, each cut where a word ends (before white space or a CJK
    character), and held as arrays: the same ids and character spans as the whole text encoded at once."""
    import random

    from bertcli import tokenizer as module

    tok = load_tokenizer(tiny_tokenizer_dir)
    rng = random.Random(1)
    words = CORPUS.split() + ["北京", "\x00", "x" * 120, "Jose\u0301", "[MASK]", "\u200b", "e\u0301\u0301", "\n", ""]
    spaces = [" ", "", "\t", "  ", "\x0c", "\x85", "\u00a0", "\u3000"]
    texts = ["".join(rng.choice(words) + rng.choice(spaces) for _ in range(rng.randint(0, 400)))
             for _ in range(30)] + ["", "北京大学" * 100, "a" * 500, " " * 300 + "the fox", "page\x0cbreak " * 40]
    monkeypatch.setattr(module, "PIECE_CHARS", 50)
    foreign = json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    foreign["pre_tokenizer"] = {"type": "Whitespace"}  # another pipeline: where a word ends is not known, never cut
    other = Tokenizer.from_str(json.dumps(foreign))
    assert tok.cuts is True and load_tokenizer_from(other).cuts is None
    for t in (tok, load_tokenizer_from(other)):
        pieces = t.encode_compact(texts)
        for text, (ids, spans), whole in zip(texts, pieces, t.backend.encode_batch(texts, add_special_tokens=False)):
            assert list(ids) == whole.ids and spans.tolist() == [list(o) for o in whole.offsets]
    assert max(len(t) for t in texts) > 20 * module.PIECE_CHARS
