"""The tasks, registered in one place. A task is one file: its name, its head (a Hugging Face
architecture in checkpoint.ARCHITECTURES), its options class (the recipe's `task:` section) and
what it saves for predict. Adding one is that file and a line in TASKS below."""

from __future__ import annotations

import json
from typing import Any

from bertcli.tasks.base import Task
from bertcli.tasks.classify import ClassifyTask
from bertcli.tasks.multilabel import MultiLabelTask
from bertcli.tasks.ner import NerTask
from bertcli.tasks.pretrain import PretrainTask
from bertcli.tasks.qa import QaTask
from bertcli.tasks.regression import RegressionTask

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
    from bertcli.checkpoint import saved_architecture
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
