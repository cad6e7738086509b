"""BERT WordPiece tokenizer on Hugging Face `tokenizers`: train, load, save, encode.

A tokenizer directory holds `tokenizer.json`, `vocab.txt`, `tokenizer_config.json` and
`special_tokens_map.json`, the files Hugging Face's BertTokenizerFast reads. Loading works from
`tokenizer.json` or, for older checkpoints, from `vocab.txt` alone.
"""

from __future__ import annotations

import json
import unicodedata
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, NamedTuple, Sequence

from tokenizers import Encoding, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import WordPiece

from bertcli.errors import CheckpointError, DataError
from bertcli.fileio import atomic_write_text
from bertcli.textio import split_lines

if TYPE_CHECKING:
    import numpy as np

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHARS_PER_TOKEN = 16  # a text longer than this many characters a token is first encoded from its start alone
PIECE_CHARS = 1 << 16  # a long text is encoded this many characters at a time, where it may be cut (encode_compact)


def word_end(text: str, begin: int, at: int, cjk: bool) -> int:
    """Where to cut `text` after `begin` so that no word is cut, at `at` or before it (else the first place after
    it, else its end): before white space that BERT's normalizer keeps (a control character such as \\x0c it
    drops, so it joins the letters around it), or before a CJK character (`cjk`: the normalizer sets each apart).
    Each word is then cut into tokens alone, so the pieces' tokens are the text's."""
    def ends(i: int) -> bool:
        c = text[i]
        return c in " \t\n\r" or unicodedata.category(c) == "Zs" or (cjk and "\u4e00" <= c <= "\u9fff")

    return next((i for i in range(min(at, len(text) - 1), begin, -1) if ends(i)), None) or \
        next((i for i in range(at + 1, len(text)) if ends(i)), len(text))


class Cut(NamedTuple):
    """A text pair encoded as [CLS] first [SEP] second [SEP], cut to a length (WordPieceTokenizer.encode_truncated)."""

    ids: list[int]
    type_ids: list[int]
    overflowing: bool  # something was cut (as an Encoding's list of what was cut is, when not empty)


def _longest_first(first: int, second: int, room: int) -> tuple[int, int]:
    """How many tokens of each text of a pair tokenizers' longest_first truncation keeps within `room`: both
    when they fit; else the shorter whole up to half the room (of two alike, the first counts as the
    shorter), and the longer the rest."""
    if first + second <= room:
        return first, second
    if first > second:
        kept = min(second, room // 2)
        return room - kept, kept
    kept = min(first, room // 2)
    return kept, room - kept


class WordPieceTokenizer:
    """A `tokenizers.Tokenizer` set up as BERT's, with the special ids at hand."""

    def __init__(self, backend: Tokenizer, lowercase: bool, source: str = "tokenizer"):
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.lowercase = lowercase
        self.source = source  # the file it was read from
        ids = {tok: backend.token_to_id(tok) for tok in SPECIAL_TOKENS}
        missing = [tok for tok in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if ids[tok] is None]
        if missing:
            raise CheckpointError(f"{source}: the vocabulary has no {', '.join(missing)} token")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id = (ids[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"))
        self.mask_id = ids["[MASK]"]  # None is fine except for pretraining
        if not isinstance(backend.model, WordPiece):
            raise CheckpointError(f"{source}: a {type(backend.model).__name__} tokenizer, not BERT's WordPiece: its ids "
                                  "would not be the words the model learnt")
        single, pair = (backend.encode(*texts).ids for texts in (("a",), ("a", "b")))
        cls, sep = self.cls_id, self.sep_id
        if not (single[0] == cls and single[-1] == sep and pair[0] == cls and pair[-1] == sep and pair.count(sep) == 2):
            raise CheckpointError(f"{source}: its post-processor does not wrap texts as BERT's does ([CLS] a [SEP], "
                                  "and [CLS] a [SEP] b [SEP] for a pair), so the model would read them without the "
                                  "tokens it learnt from")
        # A text may be cut where a word ends (word_end) and its pieces encoded apart when the pipeline is
        # BERT's own; None: another normalizer or pre-tokenizer, or an added token holding white space.
        spaced = any(ch.isspace() for t in backend.get_added_tokens_decoder().values() for ch in t.content)
        self.cuts: bool | None = None
        if isinstance(backend.normalizer, normalizers.BertNormalizer) and not spaced and \
                isinstance(backend.pre_tokenizer, pre_tokenizers.BertPreTokenizer):
            self.cuts = bool(backend.normalizer.handle_chinese_chars)  # (True: before a CJK character too)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def id_limit(self) -> int:
        """One more than the largest token id: the rows an embedding needs (more than vocab_size
        when ids have gaps, e.g. a vocab.txt that repeats a token)."""
        return max(self.backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def encode(self, text: str, pair: str | None = None, add_special_tokens: bool = True) -> Encoding:
        return self.backend.encode(text, pair, add_special_tokens=add_special_tokens)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[Encoding]:
        return self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)

    def encode_truncated(self, inputs: list, max_len: int) -> list[Encoding | Cut]:
        """Texts (or text pairs) encoded with their special tokens, each cut to `max_len` tokens (what is cut
        is in an Encoding's `overflowing`; a pair's Cut says whether anything was). A long single text is
        encoded from its start alone (`_start`), so a line of a megabyte costs what its first tokens cost, with
        the same ids. A pair is cut as tokenizers' longest_first cuts it, by `_longest_first` rather than by
        tokenizers itself, which makes every combination of the two texts' overflowing windows (quadratic:
        20 s for a pair of 40,000 and 24,000 characters)."""
        out: list = [None] * len(inputs)
        singles = [i for i, x in enumerate(inputs) if not isinstance(x, tuple)]
        starts = [self._start(inputs[i], max_len) for i in singles]  # (before truncation is set: it counts tokens)
        self.backend.enable_truncation(max_len)
        try:
            for i, enc in zip(singles, self.backend.encode_batch(starts)):
                out[i] = enc
        finally:
            self.backend.no_truncation()
        pairs = [i for i, x in enumerate(inputs) if isinstance(x, tuple)]
        firsts = self.backend.encode_batch([inputs[i][0] for i in pairs], add_special_tokens=False)
        seconds = self.backend.encode_batch([inputs[i][1] for i in pairs], add_special_tokens=False)
        for i, a, b in zip(pairs, firsts, seconds):
            k, j = _longest_first(len(a.ids), len(b.ids), max_len - 3)
            out[i] = Cut([self.cls_id, *a.ids[:k], self.sep_id, *b.ids[:j], self.sep_id], [0] * (k + 2) + [1] * (j + 1),
                         k < len(a.ids) or j < len(b.ids))
        return out

    def _start(self, text: str, max_len: int) -> str:
        """The text, or a start of it cut where a word ends (`word_end`) that has more than `max_len` tokens, so
        the text's first `max_len` are its."""
        size = max_len * CHARS_PER_TOKEN
        while self.cuts is not None and size < len(text):
            cut = word_end(text, 0, size, self.cuts)
            if cut >= len(text):
                break
            if len(self.backend.encode(text[:cut], add_special_tokens=False).ids) > max_len:
                return text[:cut]
            size = max(size, cut) * 4  # (a start of long words, or of characters the normalizer drops, holds fewer tokens)
        return text

    def encode_compact(self, texts: Sequence[str]) -> list[tuple[array, np.ndarray]]:
        """Each text's token ids (no special tokens) and each token's character span, as compact arrays (4 bytes
        an id, 8 a span: the tokenizer's encoding and Python's lists of them take about 450 bytes a token). A
        long text is encoded PIECE_CHARS characters at a time, cut where a word ends (the same tokens), and
        about 4 x PIECE_CHARS characters go through the tokenizer in one call."""
        import numpy as np

        ids = [array("i") for _ in texts]
        spans: list[list[np.ndarray]] = [[] for _ in texts]
        pending: list[tuple[int, int, str]] = []  # (text, where the piece starts in it, the piece)

        def encode() -> None:
            for (k, begin, _), enc in zip(pending, self.backend.encode_batch([p for *_, p in pending],
                                                                             add_special_tokens=False)):
                ids[k].extend(enc.ids)
                spans[k].append(np.array(enc.offsets, dtype=np.int32).reshape(-1, 2) + begin)
            pending.clear()

        held = 0  # characters pending
        for k, text in enumerate(texts):
            begin = 0
            while True:
                end = len(text) if len(text) - begin <= PIECE_CHARS or self.cuts is None else \
                    word_end(text, begin, begin + PIECE_CHARS, self.cuts)
                pending.append((k, begin, text[begin:end]))
                held, begin = held + end - begin, end
                if held >= 4 * PIECE_CHARS:
                    encode()
                    held = 0
                if begin >= len(text):
                    break
        encode()
        return [(i, np.concatenate(s)) for i, s in zip(ids, spans)]

    def save(self, directory: str | Path, model_max_length: int = 512) -> None:
        """Write the four tokenizer files into `directory` (each atomically)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        clean = Tokenizer.from_str(self.backend.to_str())  # saved without any truncation or padding set here
        clean.no_truncation()
        clean.no_padding()
        atomic_write_text(out / "tokenizer.json", clean.to_str(pretty=True))
        vocab = sorted(self.backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        atomic_write_text(out / "vocab.txt", "".join(f"{tok}\n" for tok, _ in vocab))
        special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
        config = {"tokenizer_class": "BertTokenizer", "do_lower_case": self.lowercase, "tokenize_chinese_chars": True,
                  "strip_accents": None, "model_max_length": model_max_length, **special}
        atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        atomic_write_text(out / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")


def _bert_pipeline(backend: Tokenizer, lowercase: bool) -> Tokenizer:
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


def _add_post_processor(backend: Tokenizer) -> None:
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    if cls is None or sep is None:
        return  # WordPieceTokenizer reports the missing tokens
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])


def train_tokenizer(files: Iterable[str | Path], vocab_size: int = 30522, lowercase: bool = True,
                    min_frequency: int = 2, shown: str = "") -> WordPieceTokenizer:
    """A WordPiece vocabulary learnt from `files` (`shown`: how messages name them, when a pipe was spooled)."""
    paths = [str(f) for f in files]
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise DataError(f"{p}: file not found")
        if path.is_dir():
            raise DataError(f"{p}: is a directory, expected a text file")
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise DataError(f"--vocab-size must be at least {len(SPECIAL_TOKENS) + 1}, got {vocab_size}")
    backend = _bert_pipeline(Tokenizer(WordPiece(unk_token="[UNK]")), lowercase)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=SPECIAL_TOKENS, continuing_subword_prefix="##",
                                        show_progress=False)
    try:
        backend.train(paths, trainer)
    except Exception as err:  # the Rust trainer reports unreadable files and bad encodings this way
        raise DataError(f"cannot train a tokenizer on {', '.join(paths)}: {err}") from None
    if backend.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise DataError(f"{shown or ', '.join(paths)}: no text to learn a vocabulary from (empty, or blank lines "
                        "alone)")
    _add_post_processor(backend)
    return WordPieceTokenizer(backend, lowercase)


def tokenizer_difference(a: WordPieceTokenizer, b: WordPieceTokenizer) -> str | None:
    """The first part of their pipelines in which two tokenizers differ (normalizer, pre_tokenizer, or
    model: the vocabulary), or None when they give the same ids for the same text."""
    mine, theirs = (json.loads(t.backend.to_str()) for t in (a, b))
    parts = {"normalizer": "normalizer (lower-casing, accents)", "pre_tokenizer": "pre-tokenizer (how text splits "
             "into words)", "model": "vocabulary"}
    return next((name for part, name in parts.items() if mine.get(part) != theirs.get(part)), None)


def load_tokenizer(directory: str | Path) -> WordPieceTokenizer:
    """Load from `tokenizer.json`, or build BERT's pipeline around `vocab.txt`."""
    d = Path(directory)
    if not d.is_dir():
        found = "is a file, not a tokenizer directory" if d.exists() else "tokenizer directory not found"
        raise CheckpointError(f"{directory}: {found}")
    lowercase = _read_lowercase(d)
    if (d / "tokenizer.json").is_file():
        try:
            backend = Tokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as err:
            raise CheckpointError(f"{d / 'tokenizer.json'}: not a valid tokenizer file: {err}") from None
        if lowercase is None:
            lowercase = bool(getattr(backend.normalizer, "lowercase", True))
        _keep_specials_whole(backend)  # (a run started from a vocab.txt before this saved them as words)
        return WordPieceTokenizer(backend, lowercase, source=str(d / "tokenizer.json"))
    if (d / "vocab.txt").is_file():
        lowercase = True if lowercase is None else lowercase
        vocab = _read_vocab(d / "vocab.txt")
        backend = _bert_pipeline(Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100)), lowercase)
        _keep_specials_whole(backend)
        _add_post_processor(backend)
        return WordPieceTokenizer(backend, lowercase, source=str(d / "vocab.txt"))
    raise CheckpointError(f"{directory}: no tokenizer.json or vocab.txt (not a tokenizer directory)")


def _keep_specials_whole(backend: Tokenizer) -> None:
    """`[MASK]`, `[SEP]`, ... written in the text are read as those tokens, as transformers' BertTokenizer reads
    them (exactly so written, before lower-casing), not cut into `[`, `mask`, `]`."""
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [t for t in SPECIAL_TOKENS if t not in added and backend.token_to_id(t) is not None]
    if missing:
        backend.add_special_tokens(missing)


def _read_lowercase(d: Path) -> bool | None:
    path = d / "tokenizer_config.json"
    if not path.is_file():
        return None
    if path.stat().st_size > 1 << 20:
        raise CheckpointError(f"{path}: over 1 MiB, too large for a tokenizer configuration")
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("do_lower_case")
    except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
        raise CheckpointError(f"{path}: not a valid JSON object") from None
    return value if isinstance(value, bool) else None


def _read_vocab(path: Path) -> dict[str, int]:
    try:
        lines = split_lines(path.read_text(encoding="utf-8-sig"))  # (a byte-order mark is not part of line 1)
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: not UTF-8 (byte offset {err.start})") from None
    if not lines:
        raise CheckpointError(f"{path}: the vocabulary is empty")
    # ids are line numbers, as in Google's and Hugging Face's BERT (a repeated token keeps its last line)
    vocab = {token: i for i, token in enumerate(lines)}
    return vocab
