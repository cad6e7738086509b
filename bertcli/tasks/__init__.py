"""The tasks, registered in one place. A task is one file: its name, its head (a Hugging Face
architecture in checkpoint.ARCHITECTURES), its options class (the recipe's `task:` section) and
what it saves for predict. Adding one is that file and a line in TASKS below."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bertcli.tasks.base import Task, TaskOptions
from bertcli.tasks.classify import ClassifyTask
from bertcli.tasks.multilabel import MultiLabelTask
from bertcli.tasks.ner import NerTask
from bertcli.tasks.pretrain import PretrainTask
from bertcli.tasks.qa import QaTask
from bertcli.tasks.regression import RegressionTask

if TYPE_CHECKING:
    from bertcli.config import BertConfig

TASKS: dict[str, type[Task]] = {task.name: task for task in (
    PretrainTask,
    ClassifyTask,
    NerTask,
    QaTask,
    RegressionTask,
    MultiLabelTask,
)}


PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")  # transformers'


def task_for_checkpoint(raw: dict[str, Any], labels: list[str], source: str) -> type[Task]:
    """The task a checkpoint was saved for: the name bertcli saved in config.json, or for a checkpoint from
    elsewhere its head and problem_type, read as transformers reads them (a pretrained one's MLM head is the
    pretrain task: evaluate scores it on text, predict fills in [MASK])."""
    from bertcli.config import saved_architecture
    from bertcli.errors import CheckpointError

    architecture = saved_architecture(raw)
    saved = raw.get("bertcli_task")
    name = saved.get("name") if isinstance(saved, dict) else None
    problem = raw.get("problem_type")
    if problem is not None and problem not in PROBLEM_TYPES:
        raise CheckpointError(f"{source}: problem_type must be one of {', '.join(PROBLEM_TYPES)}, got "
                              f"{json.dumps(problem)[:80]}")
    if name is not None:
        if not isinstance(name, str):
            raise CheckpointError(f"{source}: bertcli_task.name must be a task's name, got {json.dumps(name)[:80]}")
        if name not in TASKS:
            raise CheckpointError(f"{source}: bertcli_task.name {str(name)[:80]!r} is not a task of this bertcli "
                                  f"({', '.join(TASKS)}); was it saved by a newer version?")
        task = TASKS[name]
    else:
        heads = [t for t in TASKS.values() if t.architecture == architecture]
        if len(heads) > 1:  # BertForSequenceClassification: the loss transformers would choose
            problem = problem or ("regression" if len(labels) == 1 else "single_label_classification")
            heads = [t for t in heads if t.problem_type == problem]
        if not heads:
            raise CheckpointError(f"{source}: a {architecture} checkpoint"
                                  + (f" with problem_type {problem!r}" if problem else "")
                                  + " has no task head bertcli knows: fine-tune it first with `bertcli finetune`")
        task = heads[0]
    if task.architecture != architecture:
        raise CheckpointError(f"{source}: bertcli_task.name is {task.name!r}, whose head is {task.architecture}, but "
                              f"architectures says {architecture}")
    if problem is not None and task.problem_type not in (None, problem):
        raise CheckpointError(f"{source}: problem_type is {problem!r}, but bertcli_task.name {task.name!r} is "
                              f"{task.problem_type}")
    if task.needs_labels and not labels:
        raise CheckpointError(f"{source}: no id2label: the label names of the {task.name} head are unknown")
    if task.outputs_needed is not None and len(labels) not in (0, task.outputs_needed):
        raise CheckpointError(f"{source}: a {task.name} head has {task.outputs_needed} output(s), but id2label names "
                              f"{len(labels)}")
    if task.min_labels > len(labels) > 0:
        raise CheckpointError(f"{source}: a {task.name} head needs at least {task.min_labels} labels, but id2label "
                              f"names {len(labels)}")
    return task


def load_task(model_dir: str | Path) -> tuple[BertConfig, Task]:
    """The task a checkpoint directory was saved for, with its tokenizer, labels and saved options, checked
    as evaluate and predict need them; torch is not imported (the weights are read by whoever runs them)."""
    from bertcli.config import check_tokenizer, read_config, read_labels
    from bertcli.errors import CheckpointError, DataError
    from bertcli.tokenizer import load_tokenizer

    cfg, raw = read_config(model_dir)
    source = str(Path(model_dir) / "config.json")
    labels = read_labels(raw, source)
    cls = task_for_checkpoint(raw, labels, source)
    options, max_seq_len = saved_task_options(raw, cls, cfg, source)
    tokenizer = load_tokenizer(model_dir)
    check_tokenizer(tokenizer, cfg, str(model_dir))
    try:
        task = cls(tokenizer, options, max_seq_len, labels)
    except DataError as err:  # said of a recipe's keys: here they are the checkpoint's
        text = re.sub(r"(?<![\w.])(?:data|task)\.", "bertcli_task.", str(err))
        raise CheckpointError(f"{source}: {text} (the window and options it answers with, saved by the run that "
                              "trained it; set them in config.json's bertcli_task)") from None
    check_task_segments(task, cfg, str(model_dir))
    return cfg, task


def saved_task_options(raw: dict, cls: type[Task], cfg: BertConfig, source: str) -> tuple[TaskOptions, int]:
    """The task's options and window saved in config.json's bertcli_task, read by the task's own options
    class and checked as a recipe's are (a checkpoint may come from anywhere): a CheckpointError names the
    first that is not what bertcli writes. Keys the task has not (of a later version) are left out."""
    from bertcli.errors import CheckpointError
    from bertcli.recipes import build_options

    from bertcli.config import masked_lm_only

    saved = raw.get("bertcli_task", {})
    if not isinstance(saved, dict):
        raise CheckpointError(f"{source}: bertcli_task must be a JSON object")
    if masked_lm_only(raw):
        saved = {**saved, "objective": "none"}  # it has no sentence head to score
    names = {f.name for f in dataclasses.fields(cls.Options)} - {"name", "labels"}
    options, problems = build_options(cls.Options, {k: v for k, v in saved.items() if k in names}, "bertcli_task.",
                                      strict=True)
    if problems:
        raise CheckpointError(f"{source}: {problems[0]}")
    max_seq_len = saved.get("max_seq_len", min(512, cfg.max_position_embeddings))
    low = cls.Options.min_seq_len
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or \
            not low <= max_seq_len <= cfg.max_position_embeddings:
        raise CheckpointError(f"{source}: bertcli_task.max_seq_len must be in {low}..{cfg.max_position_embeddings} "
                              f"(max_position_embeddings), got {json_text(max_seq_len)}")
    return options, max_seq_len


def json_text(value) -> str:
    return json.dumps(value)[:80]


def check_task_segments(task: Task, cfg: BertConfig, source: str) -> None:
    """A task whose every input is a pair (QA's question and context) needs two token types; tasks that
    read pairs sometimes check each one."""
    check_segments(task.two_segments, cfg, source, f"{task.name} (every input a pair of texts)")
    task.segments = cfg.type_vocab_size


def check_segments(needs_two: bool, cfg: BertConfig, source: str, why: str) -> None:
    """A task that always reads two segments needs a model with two token types."""
    from bertcli.errors import CheckpointError

    if needs_two and cfg.type_vocab_size < 2:
        raise CheckpointError(f"{source}: type_vocab_size is {cfg.type_vocab_size}, but {why} needs 2 token types")
