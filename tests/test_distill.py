"""Distillation: a student from a subset of a checkpoint's layers, trained on alpha x the KL to a
teacher's distributions at temperature T (x T^2) plus (1 - alpha) x its task's loss."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from bertcli.errors import BertcliError
from bertcli.jobs import finetune
from bertcli.recipes import load_recipe
from bertcli.tasks.classify import ClassifyOptions, ClassifyTask
from bertcli.tasks.ner import NerOptions, NerTask
from bertcli.tasks.qa import QaOptions, QaTask
from bertcli.tokenizer import load_tokenizer
from conftest import REVIEWS, run_cli, write_recipe


def _kl(student, teacher, t):
    """KL(teacher || student) at temperature t, times t^2, summed: written out, not through kl_div."""
    p = (teacher / t).softmax(-1)
    return (p * (p.log() - (student / t).log_softmax(-1))).sum() * t * t


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_soft_losses_are_the_kl_over_what_each_task_s_loss_is_taken_over(tiny_tokenizer_dir, temperature):
    tok = load_tokenizer(tiny_tokenizer_dir)
    torch.manual_seed(0)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    classify = ClassifyTask(tok, ClassifyOptions(), 16, ["a", "b", "c"])
    assert classify.soft_loss(s, t, {}, {"examples": 4}, temperature) == pytest.approx(_kl(s, t, temperature) / 4, rel=1e-5)
    assert classify.soft_loss(s, s, {}, {"examples": 4}, temperature) == pytest.approx(0, abs=1e-6)

    labels = torch.tensor([[-100, 0, 2, -100], [-100, 1, -100, -100]])  # first sub-tokens carry the loss
    s, t = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    ner = NerTask(tok, NerOptions(), 16, ["O", "B-X", "I-X"])
    words = labels != -100
    found = ner.soft_loss(s, t, {"labels": labels}, {"words": 3}, temperature)
    assert found == pytest.approx(_kl(s[words], t[words], temperature) / 3, rel=1e-5)
    t2 = t.clone()
    t2[~words] = 100.0  # what the teacher says at tokens without a label changes nothing
    assert ner.soft_loss(s, t2, {"labels": labels}, {"words": 3}, temperature) == pytest.approx(found, rel=1e-6)

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    qa = QaTask(tok, QaOptions(), 128)
    (s1, s2), (t1, t2) = torch.randn(2, 2, 4).unbind(0), torch.randn(2, 2, 4).unbind(0)
    found = qa.soft_loss((s1, s2), (t1, t2), {"attention_mask": mask}, {"windows": 2}, temperature)
    expected = sum(_kl(s[r, :n], t[r, :n], temperature) for s, t in ((s1, t1), (s2, t2)) for r, n in enumerate((3, 2)))
    assert found == pytest.approx(expected / 4, rel=1e-4)


def test_distilled_loss_mixes_the_soft_and_the_task_loss_and_the_teacher_gets_no_gradient(tiny_classifier_dir):
    from bertcli.jobs import load_for_task

    ck, task = load_for_task(tiny_classifier_dir)
    teacher = load_for_task(tiny_classifier_dir)[0].model
    features = task.encode(task.read(tiny_classifier_dir.parent / "train.tsv"))
    batch = task.collate(features)
    counts = task.counts(batch)
    student = ck.model.train()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # a teacher that says something else
    hard = task.loss(student, batch, counts)
    assert task.distilled_loss(student, batch, counts, teacher, 0.0, 2.0).item() == pytest.approx(hard.item(), rel=1e-6)
    soft = task.soft_loss(task.call(student, batch), task.call(teacher, batch), batch, counts, 2.0)
    mixed = task.distilled_loss(student, batch, counts, teacher, 0.3, 2.0)
    assert mixed.item() == pytest.approx(0.3 * soft.item() + 0.7 * hard.item(), rel=1e-5)
    mixed.backward()
    assert all(p.grad is None for p in teacher.parameters()) and student.classifier.weight.grad is not None


def test_a_student_from_every_other_layer_distilled_from_its_teacher(tiny_classifier_dir, tmp_path):
    (tmp_path / "train.tsv").write_text(REVIEWS, encoding="utf-8")
    recipe = write_recipe(tmp_path / "student.yaml", {"name": "classify"},
                          {"train": str(tmp_path / "train.tsv"), "eval": str(tmp_path / "train.tsv"), "max_seq_len": 16},
                          {"max_steps": 3, "distill_alpha": 0.7, "distill_temperature": 3},
                          model={"init": str(tiny_classifier_dir), "init_layers": [1], "teacher": str(tiny_classifier_dir)})
    metrics = finetune(load_recipe(recipe), tmp_path / "student", resume=False, overwrite=False)
    assert "eval_accuracy" in metrics
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    before, after = load_file(tiny_classifier_dir / "model.safetensors"), load_file(tmp_path / "student" / "model.safetensors")
    assert not any(k.startswith("bert.encoder.layer.1.") for k in after)
    # the student's layer 0 started as the teacher's layer 1 (3 small steps move it only a little)
    start, moved = before["bert.encoder.layer.1.output.dense.weight"], after["bert.encoder.layer.0.output.dense.weight"]
    assert (moved - start).abs().max() < 0.05 < (moved - before["bert.encoder.layer.0.output.dense.weight"]).abs().max()
    done = run_cli("predict", str(tmp_path / "student"), stdin=b"i loved it\n")
    assert done.returncode == 0 and json.loads(done.stdout)["label"] in ("neg", "pos")


def test_a_teacher_that_does_not_fit_is_refused_before_training(tiny_classifier_dir, tmp_path, tiny_tokenizer_dir):
    (tmp_path / "train.tsv").write_text(REVIEWS.replace("\tpos", "\tgood").replace("\tneg", "\tbad"), encoding="utf-8")
    recipe = write_recipe(tmp_path / "student.yaml", {"name": "classify"}, {"train": str(tmp_path / "train.tsv")},
                          {"max_steps": 3}, model={"init": str(tiny_classifier_dir), "teacher": str(tiny_classifier_dir)})
    with pytest.raises(BertcliError, match="model.teacher: .* has the labels neg, pos; this run bad, good"):
        finetune(load_recipe(recipe), tmp_path / "out", resume=False, overwrite=False)
    assert not (tmp_path / "out").exists()
    for overrides, message in [
        (["model.init_layers=[0,5]"], "model.init_layers: .* has layers 0..1, not 5"),
        (["model.init_layers=[1,0]"], "model.init_layers: layer numbers from 0, each once, in order"),
        (["train.distill_alpha=1.5"], "train.distill_alpha: must be in \\[0, 1\\]"),
        (["task.name=regression", "task.label_column=label"], "model.teacher: regression does not learn from a teacher"),
    ]:
        with pytest.raises(BertcliError, match=message):
            finetune(load_recipe(recipe, overrides), tmp_path / "out", resume=False, overwrite=False)
    assert not (tmp_path / "out").exists()


def test_layer_map_is_uniform_and_ends_at_the_teachers_last_layer():
    from bertcli.distill import layer_map

    assert layer_map(3, 6) == [(0, 1), (1, 3), (2, 5)]
    assert layer_map(2, 2) == [(0, 0), (1, 1)]
    assert layer_map(4, 6) == [(0, 0), (1, 2), (2, 3), (3, 5)]
    assert layer_map(1, 12) == [(0, 11)]


def test_hidden_loss_pairs_the_real_tokens_of_packed_rows(tiny_classifier_dir):
    """On a padded batch both models run on packed rows (padding removed, rows rounded up with copies):
    the loss is the one computed from the padded (B, T, H) outputs at the real tokens alone."""
    from bertcli.distill import hidden_loss, layer_outputs
    from bertcli.jobs import load_for_task

    ck, task = load_for_task(tiny_classifier_dir)
    student, teacher = ck.model.eval(), load_for_task(tiny_classifier_dir)[0].model.eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    features = task.encode(task.read(tiny_classifier_dir.parent / "train.tsv"))
    batch = task.collate(features[:5])
    real = batch["attention_mask"].bool()
    assert not real.all() and int(real.sum()) % 16  # padding to remove, rows to round up
    pairs = [(0, 1), (1, 0)]
    wrapped = torch.nn.Module()
    wrapped.module = student  # as DistributedDataParallel holds it: the hooks go on the model inside
    with torch.no_grad(), layer_outputs(wrapped, [0, 1]) as mine, layer_outputs(teacher, [0, 1]) as its:
        task.call(student, batch)
        task.call(teacher, batch)
        found = hidden_loss(mine, its, pairs, tokens=40)
    expected = 0.0
    for s, t in pairs:
        padded = []
        for model, layer in ((student, s), (teacher, t)):
            model.bert.packed = False  # the padded path: (B, T, H) outputs
            hook = model.bert.encoder.layer[layer].register_forward_hook(lambda m, a, out: padded.append(out))
            with torch.no_grad():
                task.call(model, batch)
            hook.remove()
            model.bert.packed = True
        a, b = (x[real] for x in padded)
        expected += float((a - b).pow(2).mean(-1).sum())
    assert mine[0].shape[0] == int(real.sum())
    assert found.item() == pytest.approx(expected / 40, rel=1e-5)


def test_a_student_distilled_from_the_teachers_layers(tiny_classifier_dir, tmp_path):
    (tmp_path / "train.tsv").write_text(REVIEWS, encoding="utf-8")
    recipe = write_recipe(tmp_path / "student.yaml", {"name": "classify"},
                          {"train": str(tmp_path / "train.tsv"), "max_seq_len": 16},
                          {"max_steps": 3, "distill_hidden": 2.0},
                          model={"init": str(tiny_classifier_dir), "init_layers": [0], "teacher": str(tiny_classifier_dir)})
    done = run_cli("finetune", str(recipe), "--out", str(tmp_path / "student"))
    assert done.returncode == 0, done.stderr
    assert b"+ 2 x its layers 1" in done.stderr  # the student's one layer learns the teacher's last
    finetune(load_recipe(recipe, ["train.distill_hidden=0"]), tmp_path / "plain", resume=False, overwrite=False)
    name = "bert.encoder.layer.0.output.dense.weight"  # the same steps without the layers' loss: another layer
    hidden, plain = (load_file(tmp_path / d / "model.safetensors")[name] for d in ("student", "plain"))
    assert (hidden - plain).abs().max() > 1e-4
    for overrides, message in [
        (["model.teacher=null"], "train.distill_hidden: learns from the layers of model.teacher, which is not set"),
        (["train.distill_hidden=-1"], "train.distill_hidden: must be in \\[0, 1000\\]"),
        (["model.init_layers=[]", f"model.teacher={tmp_path / 'student'}"],
         "has 1 layers, the student 2: train.distill_hidden maps each student layer to a teacher layer"),
    ]:
        with pytest.raises(BertcliError, match=message):
            finetune(load_recipe(recipe, overrides), tmp_path / "out", resume=False, overwrite=False)
    assert not (tmp_path / "out").exists()
