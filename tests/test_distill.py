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
from conftest import REVIEWS, write_recipe


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
    torch.manual_seed(0)
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


def test_a_student_from_every_other_layer_distilled_from_its_teacher(tiny_classifier_dir, tmp_path, cli):
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
    done = cli("predict", str(tmp_path / "student"), stdin=b"i loved it\n")
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
        (["train.distill_temperature=1e-30"], "train.distill_temperature: must be at least 0.1"),  # T^2 is 0 in fp32
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


def _two_models_and_a_padded_batch(model_dir):
    """The task, a student, a teacher that says something else (its weights moved), and a batch of 5
    texts of several lengths."""
    from bertcli.jobs import load_for_task

    ck, task = load_for_task(model_dir)
    student, teacher = ck.model.eval(), load_for_task(model_dir)[0].model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return task, student, teacher, task.collate(task.encode(task.read(model_dir.parent / "train.tsv"))[:5])


def test_hidden_loss_pairs_the_real_tokens_of_packed_rows(tiny_classifier_dir):
    """On a padded batch both models run on packed rows (padding removed, rows rounded up with copies):
    the loss is the one computed from the padded (B, T, H) outputs at the real tokens alone."""
    from bertcli.distill import hidden_loss, layer_outputs

    task, student, teacher, batch = _two_models_and_a_padded_batch(tiny_classifier_dir)
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
    assert mine[0][0].shape[0] >= int(real.sum())  # the packed rows, rounded up
    assert found.item() == pytest.approx(expected / 40, rel=1e-5)


@pytest.mark.parametrize("key, weight, said", [
    ("distill_hidden", 2.0, "+ 2 x its layers 1"),  # the student's one layer learns the teacher's last
    ("distill_cls", 10.0, "+ 10 x its [CLS] vectors at layers 1"),
])
def test_a_student_distilled_from_the_teachers_layers(tiny_classifier_dir, tmp_path, key, weight, said, cli):
    (tmp_path / "train.tsv").write_text(REVIEWS, encoding="utf-8")
    recipe = write_recipe(tmp_path / "student.yaml", {"name": "classify"},
                          {"train": str(tmp_path / "train.tsv"), "max_seq_len": 16},
                          {"max_steps": 3, key: weight},
                          model={"init": str(tiny_classifier_dir), "init_layers": [0], "teacher": str(tiny_classifier_dir)})
    done = cli("finetune", str(recipe), "--out", str(tmp_path / "student"))
    assert done.returncode == 0, done.stderr
    assert said.encode() in done.stderr
    finetune(load_recipe(recipe, [f"train.{key}=0"]), tmp_path / "plain", resume=False, overwrite=False)
    name = "bert.encoder.layer.0.output.dense.weight"  # the same steps without the layers' loss: another layer
    taught, plain = (load_file(tmp_path / d / "model.safetensors")[name] for d in ("student", "plain"))
    assert (taught - plain).abs().max() > 1e-4
    cases = [
        (["model.teacher=null"], f"train.{key}: learns from the layers of model.teacher, which is not set"),
        ([f"train.{key}=-1"], f"train.{key}: must be in \\[0, 1000\\]"),
        ([f"train.{key}=nan"], f"train.{key}: expected a finite number"),
        (["model.init_layers=[]", f"model.teacher={tmp_path / 'student'}"],
         f"has 1 layers, the student 2: with train.{key} each student layer learns a teacher layer"),
    ]
    if key == "distill_cls":  # the [CLS] vector is what a classifier reads, not what ner or qa read
        cases.append((["task.name=ner"], "train.distill_cls: classify only: .*ner reads every token"))
    for overrides, message in cases:
        with pytest.raises(BertcliError, match=message):
            finetune(load_recipe(recipe, overrides), tmp_path / "out", resume=False, overwrite=False)
    assert not (tmp_path / "out").exists()


def test_cls_loss_pairs_each_texts_first_token_packed_or_padded(tiny_classifier_dir):
    """The [CLS] loss is the squared distance between length-1 vectors at each text's first token: the
    same whether the models run on packed rows or on the padded (B, T, H) layout."""
    from bertcli.distill import cls_loss, layer_outputs

    task, student, teacher, batch = _two_models_and_a_padded_batch(tiny_classifier_dir)
    assert not batch["attention_mask"].bool().all()  # padding: packed rows differ from padded ones
    pairs = [(0, 1), (1, 0)]
    found = {}
    for packed in (True, False):
        for model in (student, teacher):
            model.bert.packed = packed
        with torch.no_grad(), layer_outputs(student, [0, 1]) as mine, layer_outputs(teacher, [0, 1]) as its:
            task.call(student, batch)
            task.call(teacher, batch)
            found[packed] = cls_loss(mine, its, pairs, texts=8).item()
        if not packed:  # written out from the padded outputs
            expected = 0.0
            for s, t in pairs:
                a, b = mine[s][0][:, 0], its[t][0][:, 0]
                a, b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
                expected += float(((a - b) ** 2).sum())
            assert found[False] == pytest.approx(expected / 8, rel=1e-5)
    for model in (student, teacher):
        model.bert.packed = True
    assert found[True] == pytest.approx(found[False], rel=1e-4) and found[True] > 1e-4
    h, other = torch.randn(3, 4, 8), torch.randn(3, 4, 8)  # a batch with no padding: (B, T, H), no layout
    other[:, 0] = h[:, 0] * 5  # the same [CLS] directions, longer; every other token differs
    assert cls_loss({0: (h, None)}, {2: (other, None)}, [(0, 2)], texts=3).item() == pytest.approx(0, abs=1e-6)
    other[1, 0] = -h[1, 0]  # one text's [CLS] opposite: distance 2, squared 4
    assert cls_loss({0: (h, None)}, {2: (other, None)}, [(0, 2)], texts=3).item() == pytest.approx(4 / 3, rel=1e-5)
