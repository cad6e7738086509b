"""One file per task behind one small interface (tasks/base.py)."""

from __future__ import annotations

from bertcli.tasks.base import Task


def make_task(name: str, **kwargs) -> Task:
    """The task class for a recipe's task.name (imported lazily: each pulls in torch)."""
    if name == "classify":
        from bertcli.tasks.classify import ClassifyTask as cls
    elif name == "ner":
        from bertcli.tasks.ner import NerTask as cls
    elif name == "qa":
        from bertcli.tasks.qa import QaTask as cls
    else:
        raise ValueError(f"no fine-tuning task named {name!r}")
    return cls(**kwargs)


def task_for_architecture(architecture: str) -> str:
    names = {"BertForSequenceClassification": "classify", "BertForTokenClassification": "ner",
             "BertForQuestionAnswering": "qa"}
    if architecture not in names:
        from bertcli.errors import CheckpointError

        raise CheckpointError(f"a {architecture} checkpoint has no task head: fine-tune it first with `bertcli finetune`")
    return names[architecture]
