"""The command line as a user meets it: help, exit codes, clear messages, pipes."""

from __future__ import annotations

import json
import re

import pytest

from conftest import CORPUS, run_cli

COMMANDS = [["tokenize", "train"], ["tokenize", "show"], ["tokenize", "encode"], ["pretrain"], ["finetune"],
            ["evaluate"], ["predict"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(command):
    done = run_cli(*command, "--help")
    assert done.returncode == 0
    example = done.stdout.split(b"Example:")[-1]
    assert b"Example:" in done.stdout and b"bertcli " + command[0].encode() in example


def test_tokenize_train_then_show_in_a_pipe(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS * 5, encoding="utf-8")
    done = run_cli("tokenize", "train", "--corpus", str(corpus), "--out", str(tmp_path / "tok"), "--vocab-size", "200")
    assert done.returncode == 0, done.stderr
    assert b"tokenizer: 200 tokens from 1 file(s)" in done.stderr
    done = run_cli("tokenize", "show", "--tokenizer", str(tmp_path / "tok"), stdin="Hello world\n\nquick fox".encode())
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert len(lines) == 3  # a blank line still gets its answer
    assert lines[0]["tokens"][0] == "[CLS]" and lines[0]["tokens"][-1] == "[SEP]"
    assert len(lines[0]["ids"]) == len(lines[0]["offsets"]) == len(lines[0]["tokens"])
    assert lines[1]["tokens"] == ["[CLS]", "[SEP]"]
    # an existing output is kept unless --overwrite
    before = (tmp_path / "tok" / "vocab.txt").read_bytes()
    done = run_cli("tokenize", "train", "--corpus", str(corpus), "--out", str(tmp_path / "tok"), "--vocab-size", "150")
    assert done.returncode == 2 and b"--overwrite" in done.stderr
    assert (tmp_path / "tok" / "vocab.txt").read_bytes() == before
    done = run_cli("tokenize", "train", "--corpus", str(corpus), "--out", str(tmp_path / "tok"), "--vocab-size",
                   "100000", "--overwrite")
    assert done.returncode == 0 and (tmp_path / "tok" / "vocab.txt").read_bytes() != before
    said = re.search(rb"tokenizer: (\d+) tokens \(fewer than --vocab-size 100000: the corpus has no more", done.stderr)
    assert said and int(said[1]) == len((tmp_path / "tok" / "vocab.txt").read_text().splitlines()), done.stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    done = run_cli("tokenize", "train", "--corpus", str(corpus), "--out", str(tmp_path / "mine"), "--overwrite")
    assert done.returncode == 2 and b"--overwrite refused" in done.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_invalid_utf8_on_stdin_names_line_and_byte(tiny_tokenizer_dir):
    """As predict: a line that cannot be read gets an error line in its place (the lines stay aligned with the
    input), the rest are answered, and the exit code is 2."""
    done = run_cli("tokenize", "show", "--tokenizer", str(tiny_tokenizer_dir), stdin=b"fine\nbad \xff byte\nok\x00\nend\r\n")
    assert done.returncode == 2 and b"Traceback" not in done.stderr
    first, bad, nul, end = [json.loads(line) for line in done.stdout.splitlines()]
    assert bad == {"error": "stdin: line 2: not UTF-8 text (byte offset 9)"} and "line 3: NUL byte" in nul["error"]
    assert first["tokens"][1:-1] and end["offsets"][-2][1] == 3  # (the \r is the line ending's, not text)
    assert b"2 of 4 input line(s) could not be read" in done.stderr


def test_bad_recipe_is_one_message_with_exit_2(tmp_path, tiny_tokenizer_dir):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"task: {{name: classify}}\ntokenizer: {tiny_tokenizer_dir}\n"
                      "data: {trian: x.tsv, max_seq_len: long}\ntrain: {epochs: 1}\n", encoding="utf-8")
    done = run_cli("finetune", str(recipe), "--set", "data.eval=missing.tsv")
    err = done.stderr.decode()
    assert done.returncode == 2 and "Traceback" not in err
    assert "data.trian: unknown key (did you mean 'data.train'?)" in err
    assert "data.max_seq_len: expected an integer" in err
    assert "data.eval: file not found: missing.tsv" in err


def test_missing_checkpoint_is_a_user_error(tmp_path):
    done = run_cli("tokenize", "show", "--tokenizer", str(tmp_path / "none"))
    assert done.returncode == 2 and b"not found" in done.stderr and b"Traceback" not in done.stderr


def test_unknown_option_is_a_usage_error():
    done = run_cli("tokenize", "train", "--no-such-flag")
    assert done.returncode == 2


def test_reader_closing_the_pipe_early_ends_quietly(tiny_tokenizer_dir):
    import subprocess
    import sys

    from conftest import ROOT

    script = (f"yes 'the quick brown fox' | head -n 200000 | {sys.executable} -m bertcli tokenize show "
              f"--tokenizer {tiny_tokenizer_dir} | head -n 1")
    done = subprocess.run(["bash", "-o", "pipefail", "-c", script], capture_output=True, cwd=ROOT, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert json.loads(done.stdout)["tokens"][0] == "[CLS]"
    assert b"Traceback" not in done.stderr and b"BrokenPipe" not in done.stderr, done.stderr
