"""The tasks, registered in one place. A task is one file: its name, its head (a Hugging Face
architecture in checkpoint.ARCHITECTURES), its options class (the recipe's `task:` section) and
what it saves for predict. Adding one is that file and a line in TASKS below."""

from __future__ import annotations

from typing import Any

from bertcli.tasks.base import Task, TaskOptions
from bertcli.tasks.classify import ClassifyTask
from bertcli.tasks.multilabel import MultiLabelTask
from bertcli.tasks.ner import NerTask
from bertcli.tasks.pretrain import PretrainTask
from bertcli.tasks.qa import QaTask
from bertcli.tasks.regression import RegressionTask

TASKS: dict[str, Any] = {task.name: task for task in (
    PretrainTask,
    ClassifyTask,
    NerTask,
    QaTask,
    RegressionTask,
    MultiLabelTask,
)}


def options_class(name: str) -> type[TaskOptions]:
    return TASKS[name].Options


def task_for_checkpoint(raw: dict[str, Any], labels: list[str], source: str) -> type[Task]:
    """The task a fine-tuned checkpoint was saved for: the name bertcli saved in config.json, or for a
    checkpoint from elsewhere its head and problem_type, read as transformers reads them."""
    from bertcli.checkpoint import saved_architecture
    from bertcli.errors import CheckpointError

    architecture = saved_architecture(raw)
    saved = raw.get("bertcli_task")
    name = saved.get("name") if isinstance(saved, dict) else None
    if name is not None:
        if name not in TASKS:
            raise CheckpointError(f"{source}: bertcli_task.name {str(name)[:80]!r} is not a task of this bertcli "
                                  f"({', '.join(TASKS)}); was it saved by a newer version?")
        task = TASKS[name]
    else:
        problem = raw.get("problem_type")
        heads = [t for t in TASKS.values() if t.architecture == architecture]
        if len(heads) > 1:  # BertForSequenceClassification: the loss transformers would choose
            problem = problem or ("regression" if len(labels) == 1 else "single_label_classification")
            heads = [t for t in heads if t.problem_type == problem]
        if not heads:
            raise CheckpointError(f"{source}: a {architecture} checkpoint"
                                  + (f" with problem_type {str(problem)[:80]!r}" if problem else "")
                                  + " has no task head bertcli knows: fine-tune it first with `bertcli finetune`")
        task = heads[0]
    if task is PretrainTask:
        raise CheckpointError(f"{source}: a pretrained checkpoint has no task head: fine-tune it first with "
                              "`bertcli finetune`")
    if task.architecture != architecture:
        raise CheckpointError(f"{source}: bertcli_task.name is {task.name!r}, whose head is {task.architecture}, but "
                              f"architectures says {architecture}")
    return task
