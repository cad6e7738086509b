"""The Typer layer: parse arguments, call the core, map errors to exit codes.

Exit codes: 0 success, 2 a problem in the user's input (one message, no traceback),
1 an internal error (traceback kept). Heavy modules (torch) are imported inside the
commands so that `bertcli --help` starts quickly.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from bertcli.errors import BertcliError, Interrupted
from bertcli.streams import Closed, drop_stdout, guard

app = typer.Typer(
    name="bertcli",
    help="Pretrain BERT on your own corpus; fine-tune, evaluate and serve it for classification (sentiment), "
         "NER, QA, regression and multi-label classification.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
tokenize_app = typer.Typer(help="Train a WordPiece tokenizer, encode a corpus into shards, or show tokens.",
                           no_args_is_help=True, rich_markup_mode=None)
app.add_typer(tokenize_app, name="tokenize")

RecipeArg = typer.Argument(..., help="YAML recipe (see recipes/).", show_default=False, metavar="RECIPE")
OutOpt = typer.Option(None, "--out", help="Output directory (overrides the recipe's `output`).")
SetOpt = typer.Option(None, "--set", help="Override a recipe value, e.g. --set train.lr=3e-5 (repeatable).")
ResumeOpt = typer.Option(False, "--resume", help="Continue the run in an existing output directory.")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _precision(value: str) -> str:
    if value not in PRECISIONS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(PRECISIONS)}")
    return value


PrecisionOpt = typer.Option("auto", "--precision", callback=_precision, help="Inference precision: auto (bf16 where "
                            "the hardware has native bf16, else fp32), fp32, bf16, fp16 (GPU).")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace an existing output directory.")


def _err(message: str) -> None:
    sys.stderr.write(message + "\n")


@tokenize_app.command("train", epilog="Example: bertcli tokenize train --corpus corpus/*.txt --out tok/ --vocab-size 8000")
def tokenize_train(
    corpus: List[Path] = typer.Option(..., "--corpus", help="Text file(s) to learn the vocabulary from (repeatable)."),
    out: Path = typer.Option(..., "--out", help="Directory to write tokenizer.json, vocab.txt, tokenizer_config.json, "
                                          "special_tokens_map.json."),
    vocab_size: int = typer.Option(30522, "--vocab-size", min=6, max=2_000_000,
                                   help="Vocabulary size, special tokens included."),
    cased: bool = typer.Option(False, "--cased", help="Keep case and accents (default: lower-case, as bert-base-uncased)."),
    min_frequency: int = typer.Option(2, "--min-frequency", min=0, max=2**32 - 1,
                                      help="Minimum count for a merge to enter the vocabulary."),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Train a BERT WordPiece tokenizer (CJK characters split one per token)."""
    import time

    from bertcli.data.corpus import spooled
    from bertcli.rundir import check_apart, claim, precheck
    from bertcli.textio import distinct_files
    from bertcli.tokenizer import train_tokenizer

    check_apart(out, [("--corpus", c) for c in corpus])
    distinct_files(corpus)
    precheck(out, "tokenizer", overwrite=overwrite)
    start = time.perf_counter()
    with spooled(corpus, scan=True) as files:  # the trainer reads whole files by name: a pipe is first read once, with checks
        tokenizer = train_tokenizer(files, vocab_size=vocab_size, lowercase=not cased, min_frequency=min_frequency,
                                    shown=", ".join(map(str, corpus)))
    with claim(out, "tokenizer", overwrite=overwrite):
        tokenizer.save(out)
    size, why = tokenizer.vocab_size, ""
    if size > vocab_size:
        why = (f" (more than --vocab-size {vocab_size}: the special tokens and each character of the corpus are "
               "always in it)")
    elif size < vocab_size:
        why = (f" (fewer than --vocab-size {vocab_size}: the corpus has no more words and pieces seen often enough, "
               "--min-frequency)")
    _err(f"tokenizer: {size} tokens{why} from {len(corpus)} file(s) in {time.perf_counter() - start:.1f}s -> {out}")


@tokenize_app.command("show", epilog='Example: echo "Hello world" | bertcli tokenize show --tokenizer tok/')
def tokenize_show(
    tokenizer: Path = typer.Option(..., "--tokenizer", help="Tokenizer or checkpoint directory."),
) -> None:
    """Print tokens, ids and character offsets for each stdin line, one JSON line each (a line that cannot be
    read, as predict does: an {"error": ...} line in its place, and exit code 2 at the end)."""
    import json

    from bertcli.errors import DataError
    from bertcli.textio import TooLong, decoded_line, raw_lines
    from bertcli.tokenizer import load_tokenizer

    _require_stdout("tokenize show")
    tok = load_tokenizer(tokenizer)
    if sys.stdin is None:
        raise BertcliError("stdin is closed: pipe the text in")
    failures, offset = [], 0
    with _streaming():
        for number, raw in enumerate(raw_lines(sys.stdin.buffer, "stdin"), start=1):
            start, offset = offset, offset + (raw if isinstance(raw, TooLong) else len(raw)) + 1
            try:
                enc = tok.encode(decoded_line(raw, "stdin", start, number))
                answer = {"tokens": enc.tokens, "ids": enc.ids, "offsets": [list(o) for o in enc.offsets]}
            except DataError as err:
                failures.append(str(err))
                answer = {"error": str(err)}
            sys.stdout.write(json.dumps(answer, ensure_ascii=False) + "\n")
            sys.stdout.flush()
    if failures:
        raise BertcliError(f"{len(failures)} of {number} input line(s) could not be read and were answered with an "
                           f"error object; the first: {failures[0]}")


@tokenize_app.command("encode", epilog="Example: bertcli tokenize encode --tokenizer tok/ --corpus corpus/*.txt --out shards/")
def tokenize_encode(
    tokenizer: Path = typer.Option(..., "--tokenizer", help="Tokenizer or checkpoint directory."),
    corpus: List[Path] = typer.Option(..., "--corpus", help="Text file(s) to encode (repeatable)."),
    out: Path = typer.Option(..., "--out", help="Directory for the token shards."),
    segmenter: str = typer.Option("none", "--segmenter", help="Word segmenter for Chinese whole-word masking: "
                                  "none or jieba (pip install -e '.[zh]' in bertcli's clone)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an encode that was stopped (Ctrl-C, SIGTERM, a "
                                "kill): the shards it finished are checked against the text and kept."),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Encode raw text into memory-mapped token shards for pretraining (documents and
    sentences kept; blank lines separate documents). Memory stays flat however large the text:
    it is read as a stream and cut into shards of about 64 MB of text at document boundaries."""
    import time

    from bertcli.data.encode import encode_corpus
    from bertcli.textio import distinct_files, read_once
    from bertcli.tokenizer import load_tokenizer

    from bertcli.rundir import check_apart, claim, precheck

    check_apart(out, [("--tokenizer", tokenizer)] + [("--corpus", c) for c in corpus])
    read_once(corpus)
    distinct_files(corpus)
    precheck(out, "shards", resume=resume, overwrite=overwrite)
    start = time.perf_counter()
    loaded = load_tokenizer(tokenizer)
    with claim(out, "shards", resume=resume, overwrite=overwrite):
        index = encode_corpus(loaded, corpus, out, segmenter=segmenter, resume=resume)
    _err(f"shards: {index['documents']} documents, {index['sentences']} sentences, {index['tokens']} tokens "
         f"({index['dtype']}) from {len(corpus)} file(s) in {time.perf_counter() - start:.1f}s -> {out}")


@app.command(epilog="Example: bertcli pretrain recipes/pretrain-tiny.yaml --set train.max_steps=1000")
def pretrain(recipe: Path = RecipeArg, out: Optional[Path] = OutOpt, set_: Optional[List[str]] = SetOpt,
             resume: bool = ResumeOpt, overwrite: bool = OverwriteOpt) -> None:
    """Pretrain BERT with masked language modelling (+ NSP or SOP). Under
    `torchrun --nproc_per_node N -m bertcli pretrain RECIPE` it runs distributed (DDP)."""
    loaded = _load(recipe, set_, "pretrain")
    from bertcli.jobs import pretrain as run_pretrain

    run_pretrain(loaded, out, resume, overwrite, source=recipe, keep_memory=True)


@app.command(epilog="Example: bertcli finetune recipes/sentiment-sst2.yaml --set train.epochs=1\n\n"
             "A suite: bertcli finetune recipes/glue/*.yaml --set model.init=runs/my-bert --out runs/glue\n\n"
             "A sweep: bertcli finetune recipes/glue/rte.yaml --sweep train.lr=2e-5,3e-5,5e-5 --sweep train.epochs=2,3 "
             "--out runs/rte-sweep")
def finetune(recipes: List[Path] = typer.Argument(..., help="YAML recipe(s) (see recipes/); several make a suite.",
                                                   show_default=False, metavar="RECIPE..."),
             out: Optional[Path] = OutOpt, set_: Optional[List[str]] = SetOpt,
             sweep: Optional[List[str]] = typer.Option(None, "--sweep", help="Run a grid: KEY=V1,V2,... (repeatable; "
                                                       "one run per combination)."),
             resume: bool = ResumeOpt, overwrite: bool = OverwriteOpt) -> None:
    """Fine-tune a checkpoint for a task: classify, ner, qa, regression or multilabel (task.name).

    Several recipes make a suite (GLUE's, say), and --sweep a grid: each run goes into its own
    sub-directory of --out (named after its recipe, and its values), one after another, and one
    table ranks them by each recipe's task.headline metrics, as does --out/suite.json. The same
    command with --resume continues an interrupted suite: finished runs are kept. To spread a
    sweep over machines, give each machine its own --out and part of the values (--sweep
    train.lr=2e-5 here, --sweep train.lr=3e-5,5e-5 there): the runs are independent."""
    if os.environ.get("WORLD_SIZE", "1") != "1":  # each process would claim --out (a suite's too) and train alone
        raise BertcliError(f"finetune runs in one process; under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}) "
                           "run it as `bertcli finetune ...` instead (torchrun spreads pretrain alone)")
    if len(recipes) == 1 and not sweep:
        loaded = _load(recipes[0], set_, "finetune")
        from bertcli.jobs import finetune as run_finetune

        run_finetune(loaded, out, resume, overwrite, source=recipes[0], keep_memory=True)
        return
    from bertcli.suite import plan, render, run_suite

    if out is None:
        raise BertcliError("a suite or sweep needs --out DIR: each run goes into a sub-directory of it")
    points = plan(list(recipes), set_ or [], sweep or [])
    summary = run_suite(points, out, resume, overwrite, keep_memory=True)
    if CLOSED.stdout:  # (the runs and suite.json are the work; the table is their summary)
        _err(f"stdout is closed: the table is not shown; {out / 'suite.json'} has it")
    try:
        sys.stdout.write(render(summary))
        sys.stdout.flush()
    except BrokenPipeError:
        drop_stdout()  # the reader went away (`| head -1`): the exit code still says whether every run succeeded
    if summary.get("failed"):
        first = next(r for r in summary["runs"] if "error" in r)
        raise BertcliError(f"{summary['failed']} of {len(summary['runs'])} runs failed (the table has the others); "
                           f"the first, {first['name']}: {first['error']}")


@app.command(epilog="Example: bertcli evaluate runs/sst2 --data dev.tsv --out metrics.json")
def evaluate(model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="A checkpoint directory: fine-tuned, "
                                              "or pretrained (scored on text by its masked words)."),
             data: Path = typer.Option(..., "--data", help="Labelled data in the task's format."),
             out: Optional[Path] = typer.Option(None, "--out", help="Also write the metrics as JSON here."),
             report: Optional[Path] = typer.Option(None, "--report", help="Also write PNG figures into this directory "
                                                   "(confusion matrix; loss and metric curves of the run)."),
             precision: str = PrecisionOpt) -> None:
    """Score a model on labelled data (a pretrained one on text): a table on stdout, JSON with --out."""
    from bertcli.evaluate import check_outputs, evaluate as run_evaluate, render, write_json

    if out is None:
        _require_stdout("evaluate", "or give --out FILE")  # (the scores would go nowhere)
    check_outputs(out, report, inputs=[model_dir, data])  # before the model runs, not after
    metrics = run_evaluate(model_dir, data, precision=precision)
    if out is not None:
        write_json(out, metrics)
    if report is not None:
        from bertcli.report import write_report
        from bertcli.rundir import claim

        with claim(report, "report", overwrite=True, replacing="--report"):
            for path in write_report(report, metrics, model_dir):
                _err(f"wrote {path}")
    with _streaming():  # the files are written: a reader that goes away ends nothing more
        sys.stdout.write(render(metrics))
        sys.stdout.flush()


@app.command(epilog="Example: cat reviews.txt | bertcli predict runs/sst2 > predictions.jsonl")
def predict(model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="A checkpoint directory: fine-tuned, "
                                             "or pretrained (it fills in each [MASK])."),
            input: Optional[Path] = typer.Option(None, "--input", help="Read this file instead of stdin."),
            batch_size: int = typer.Option(32, "--batch-size", min=1, max=4096,  # lines read ahead: 64 batches, so memory stays flat
                                           help="Lines per batch, at most (1 to 4,096)."),
            precision: str = PrecisionOpt,
            int8: bool = typer.Option(False, "--int8", help="int8 weights (CPU): faster, slightly less accurate; the "
                                      "exported model.int8.onnx with the onnx engine, else torch's dynamic quantization."),
            engine: str = typer.Option("auto", "--engine", help="auto (the exported graph when `bertcli export` made "
                                       "one for these settings and onnxruntime is installed, else torch), torch or onnx."),
            ) -> None:
    """Stream predictions: one JSON line on stdout per input line, in order; stderr names the engine.

    Input by task: classification, regression and multi-label, one text per line or JSONL
    {"text": ..., "text_pair": ...}; NER, one text per line; QA, JSONL {"question": ..., "context": ...};
    a pretrained model, one text per line with one or more [MASK]."""
    from bertcli.predict import open_input, run

    _require_stdout("predict")
    stream, source = open_input(input)
    with _streaming():
        run(model_dir, stream, source, sys.stdout, batch_size, precision, int8, engine)


@app.command(epilog="Example: bertcli export runs/sst2 --int8 && cat reviews.txt | bertcli predict runs/sst2 --int8")
def export(model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="A fine-tuned checkpoint directory."),
           int8: bool = typer.Option(False, "--int8", help="Also write model.int8.onnx: int8 weights (ONNX Runtime's "
                                                           "dynamic quantization).")) -> None:
    """Export a fine-tuned model as an ONNX graph, model.onnx in its directory, for `bertcli predict --engine onnx`
    (pip install -e '.[onnx]' in bertcli's clone). Each graph records the weights it was made from: predict runs it only while
    they are unchanged."""
    from bertcli.export import export as run_export
    from bertcli.export import stops_cleanly

    with stops_cleanly():  # Ctrl-C and SIGTERM: one line, and each graph whole or absent
        run_export(model_dir, int8, say=_err)


@contextlib.contextmanager
def _streaming():
    """A command that streams to stdout ends quietly with exit 0 when its reader goes away
    (`| head -1`), and with 130 on Ctrl-C, before Click can turn either into exit 1."""
    try:
        yield
    except BrokenPipeError:
        drop_stdout()
        raise typer.Exit(0) from None
    except KeyboardInterrupt:
        sys.stdout.flush()
        raise typer.Exit(130) from None


def _load(recipe: Path, overrides: Optional[List[str]], command: str):
    """The recipe, checked, for `command`: each task names the command that trains it."""
    from bertcli.errors import RecipeError
    from bertcli.recipes import load_recipe

    loaded = load_recipe(recipe, overrides or [])
    if loaded.task.command != command:
        raise RecipeError(str(recipe), [f"task.name: {loaded.task.name} recipes run with `bertcli "
                                        f"{loaded.task.command}`, not `bertcli {command}`"])
    return loaded


MULTI_VALUE_OPTIONS = ("--corpus",)


def _spread_multi_values(argv: list[str]) -> list[str]:
    """`--corpus a.txt b.txt` (what a shell glob gives) -> `--corpus a.txt --corpus b.txt`."""
    out, current = [], None
    for arg in argv:
        if arg in MULTI_VALUE_OPTIONS:
            current = arg
            out.append(arg)
            continue
        if current and not arg.startswith("-") and out[-1] != current:
            out.append(current)
        elif arg.startswith("-"):
            current = None
        out.append(arg)
    return out


CLOSED = Closed()  # the standard streams this process started without (set by main)


def _require_stdout(command: str, instead: str = "") -> None:
    if CLOSED.stdout:
        raise BertcliError(f"stdout is closed: `bertcli {command}` writes its results there; redirect it to a file"
                           + (f" {instead}" if instead else ""))


def main() -> None:
    global CLOSED
    CLOSED = guard()
    try:
        app(args=_spread_multi_values(sys.argv[1:]))
    except BertcliError as err:
        _err(f"error: {err}")
        sys.exit(2)
    except Interrupted as err:
        _err(str(err))
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # the reader closed the pipe (e.g. `| head`): end quietly
        drop_stdout()
        sys.exit(0)
    except OSError as err:  # the machine's storage refused a write not made through bertcli.fileio (stdout, say)
        from bertcli.fileio import STORAGE_ERRORS

        if err.errno not in STORAGE_ERRORS:
            raise
        _err(f"error: {err.filename or 'stdout'}: cannot write: {err.strerror}")
        drop_stdout()
        sys.exit(2)
