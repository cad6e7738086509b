"""Pretraining: shards, sequence packing, masking, learning, exact resume after SIGKILL, DDP."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bertcli.data.corpus import load_shards, split_sentences
from bertcli.data.encode import encode_corpus
from bertcli.errors import DataError
from bertcli.jobs import pretrain
from bertcli.recipes import load_recipe
from bertcli.data.sequences import make_instances
from bertcli.tasks.pretrain import A_END, A_START, B_END, B_START, LABEL, Instances, PretrainOptions, PretrainTask
from bertcli.tokenizer import load_tokenizer
from conftest import CORPUS, ROOT, write_recipe

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    text = "\n\n".join(f"Document {n} begins here. " + CORPUS.replace("\n", " ") + f" It ends with number {n}!"
                       for n in range(40))
    (d / "train.txt").write_text(text + "\n", encoding="utf-8")
    (d / "eval.txt").write_text("\n\n".join(CORPUS.splitlines()) + "\n", encoding="utf-8")
    return d


def test_sentences_split_after_end_marks():
    assert split_sentences("One. Two!  Three? four") == ["One.", "Two!", "Three?", "four"]
    assert split_sentences("北京欢迎你。今天天气很好。") == ["北京欢迎你。", "今天天气很好。"]


def test_encode_keeps_documents_and_sentences(corpus, tiny_tokenizer_dir, tmp_path):
    tok = load_tokenizer(tiny_tokenizer_dir)
    index = encode_corpus(tok, [corpus / "train.txt"], tmp_path / "shards", show_progress=False)
    assert index["documents"] == 40 and index["dtype"] == "uint16"
    (shard,) = load_shards(tmp_path / "shards", tok)
    assert len(shard.tokens) == index["tokens"] == shard.sentences[-1]
    first = shard.tokens[shard.sentences[0]:shard.sentences[1]].tolist()
    assert first == tok.encode("Document 0 begins here.", add_special_tokens=False).ids
    per_doc = np.diff(shard.documents)
    assert per_doc.sum() == index["sentences"] and (per_doc == per_doc[0]).all()


@pytest.mark.parametrize("objective", ["nsp", "sop", "none"])
def test_instances_fit_the_window_and_label_both_ways(corpus, tiny_tokenizer_dir, tmp_path, objective):
    tok = load_tokenizer(tiny_tokenizer_dir)
    encode_corpus(tok, [corpus / "train.txt"], tmp_path / "s", show_progress=False)
    shards = load_shards(tmp_path / "s", tok)
    task = PretrainTask(tok, PretrainOptions(objective=objective, short_seq_prob=0.1), 48)
    encoded = task.encode(shards, seed=1)
    inst = encoded.rows
    assert (inst == make_instances(shards, 48, objective, 0.1, seed=1)).all()
    assert max(task.lengths(encoded)) <= 48 and (inst[:, A_END] > inst[:, A_START]).all()
    if objective == "none":
        assert (inst[:, B_END] == inst[:, B_START]).all()
    else:
        assert set(inst[:, LABEL].tolist()) == {0, 1} and (inst[:, B_END] > inst[:, B_START]).all()
    if objective == "sop":  # swapped pairs: B comes before A in the text
        swapped = inst[inst[:, LABEL] == 1]
        assert (swapped[:, B_END] <= swapped[:, A_START]).all()


@pytest.mark.parametrize("objective", ["nsp", "sop", "none"])
def test_a_paragraph_without_end_marks_is_packed_whole_not_cut_to_one_window(objective, tiny_tokenizer_dir, tmp_path):
    """Lines without . ! or ? read as one sentence: Google's algorithm would truncate it to one sequence."""
    tok = load_tokenizer(tiny_tokenizer_dir)
    words = "the film begins here and ends with number seven".split()
    lines = [" ".join(words[(i + j) % len(words)] for j in range(12)) for i in range(40)]
    (tmp_path / "c.txt").write_text("\n\n".join(["\n".join(lines)] * 3) + "\n", encoding="utf-8")
    encode_corpus(tok, [tmp_path / "c.txt"], tmp_path / "s", show_progress=False)
    shards = load_shards(tmp_path / "s", tok)
    assert len(shards[0].sentences) == 4  # three documents of one sentence each
    rows = make_instances(shards, 48, objective, 0.1, seed=1)
    used = np.zeros(len(shards[0].tokens), dtype=bool)  # each document's own text, as A or as the B that follows
    for row in rows:
        used[row[A_START]:row[A_END]] = True
        if objective == "sop" or row[LABEL] == 0:  # (NSP's label 1: B is another document's)
            used[row[B_START]:row[B_END]] = True
    assert used.mean() >= 0.9 and max(PretrainTask(tok, PretrainOptions(objective=objective), 48).lengths(
        Instances(shards, rows))) <= 48
    if objective != "none":
        assert 0.3 <= rows[:, LABEL].mean() <= 0.7  # not every pair the random (NSP) or swapped (SOP) one


def test_masking_rule(corpus, tiny_tokenizer_dir, tmp_path):
    tok = load_tokenizer(tiny_tokenizer_dir)
    encode_corpus(tok, [corpus / "train.txt"], tmp_path / "s", show_progress=False)
    shards = load_shards(tmp_path / "s", tok)
    task = PretrainTask(tok, PretrainOptions(mask_prob=0.15, short_seq_prob=0.0), 64)
    inst = list(task.encode(shards, seed=1))
    batch = task.collate(inst, list(range(len(inst))))
    again = task.collate(inst, list(range(len(inst))))
    assert all((batch[k] == again[k]).all() for k in batch)  # the same seeds draw the same masks
    labels, ids = batch["mlm_labels"], batch["input_ids"]
    chosen = labels != -100
    real = ((batch["attention_mask"] == 1).numpy() & ~np.isin(ids.numpy(), task.special)) | chosen.numpy()
    assert abs(chosen.sum().item() / real.sum() - 0.15) < 0.02
    assert not np.isin(labels[chosen].numpy(), task.special).any()
    as_mask = (ids[chosen] == tok.mask_id).float().mean().item()
    kept = (ids[chosen] == labels[chosen]).float().mean().item()
    assert abs(as_mask - 0.8) < 0.05 and abs(kept - 0.1) < 0.05
    other = task.collate(inst, [s + 10_000 for s in range(len(inst))])
    assert not (other["mlm_labels"] == labels).all()  # another epoch, other masks
    whole = PretrainTask(tok, PretrainOptions(mask_prob=0.15, whole_word_mask=True), 64).collate(inst, list(range(len(inst))))
    for row_ids, row_labels in zip(whole["input_ids"], whole["mlm_labels"]):
        for p in range(1, len(row_ids)):
            original = row_labels[p].item() if row_labels[p] != -100 else row_ids[p].item()
            previous = row_labels[p - 1].item() if row_labels[p - 1] != -100 else row_ids[p - 1].item()
            if previous in task.special:
                continue
            if task.continuation[original] and (row_labels[p] != -100) != (row_labels[p - 1] != -100):
                pytest.fail("a word piece was masked without the rest of its word")


def test_masked_positions_are_read_through_an_index_made_on_the_host(corpus, tiny_tokenizer_dir, tmp_path):
    """collate lists the masked positions (flattened) on the host, and the step reads logits and targets
    through that list (index_select, which an accelerator runs without telling the host how many rows
    came out): the same logits, targets, loss and gradients as boolean indexing."""
    import torch

    from bertcli.model import BertConfig, BertForPreTraining

    tok = load_tokenizer(tiny_tokenizer_dir)
    encode_corpus(tok, [corpus / "train.txt"], tmp_path / "s", show_progress=False)
    task = PretrainTask(tok, PretrainOptions(short_seq_prob=0.5), 48)
    rows = list(task.encode(load_shards(tmp_path / "s", tok), seed=3))[:8]
    batch = task.collate(rows, list(range(8)))
    positions = batch["mlm_labels"] != -100
    assert not batch["attention_mask"].all()  # padded rows: the trunk packs them
    assert batch["mlm_index"].tolist() == positions.reshape(-1).nonzero().squeeze(1).tolist()
    assert task.counts(batch)["masked"] == int(positions.sum())
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    results = []
    for through_index in (True, False):
        model.zero_grad()
        if through_index:
            mlm, targets, _ = task.forward(model, batch)
        else:
            mlm, _ = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], mlm_positions=positions)
            targets = batch["mlm_labels"][positions]
        torch.nn.functional.cross_entropy(mlm.float(), targets).backward()
        results.append((mlm.detach(), targets, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (a, ta, ga), (b, tb, gb) = results
    assert torch.equal(ta, tb) and torch.allclose(a, b, atol=1e-6) and len(ga) == len(gb)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ga, gb))
    every_other = batch["mlm_index"][::2]  # the step reads the positions the index names, and no others
    mlm, targets, _ = task.forward(model, {**batch, "mlm_index": every_other})
    assert torch.equal(targets, tb[::2]) and torch.allclose(mlm, b[::2], atol=1e-6)


def tiny_pretrain_recipe(path, corpus, tokenizer, **train):
    return write_recipe(path, {"name": "pretrain", "objective": "nsp"},
                        {"train": str(corpus / "train.txt"), "eval": str(corpus / "eval.txt"), "max_seq_len": 48},
                        {"batch_size": 8, "lr": 2e-3, "warmup_ratio": 0.1, **train}, tokenizer=tokenizer)


def test_tiny_model_overfits_a_fixed_batch(corpus, tiny_tokenizer_dir, tmp_path):
    import torch

    from bertcli.model import BertConfig, BertForPreTraining

    tok = load_tokenizer(tiny_tokenizer_dir)
    encode_corpus(tok, [corpus / "train.txt"], tmp_path / "s", show_progress=False)
    shards = load_shards(tmp_path / "s", tok)
    task = PretrainTask(tok, PretrainOptions(short_seq_prob=0.0), 48)
    rows = list(task.encode(shards, seed=3))[:8]
    batch = task.collate(rows, list(range(8)))
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = task.loss(model, batch, task.counts(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    mlm_logits, targets, sentence_logits = task.forward(model, batch)
    assert (mlm_logits.argmax(-1) == targets).all() and (sentence_logits.argmax(-1) == batch["sentence_labels"]).all()


@pytest.fixture(scope="module")
def pretrained(corpus, tiny_tokenizer_dir, tmp_path_factory):
    """A tiny model pretrained for 60 steps, its eval metrics, and the shard cache it filled."""
    work = tmp_path_factory.mktemp("pretrained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BERTCLI_CACHE", str(work / "cache"))
        recipe = tiny_pretrain_recipe(work / "r.yaml", corpus, tiny_tokenizer_dir, max_steps=60, eval_every=30,
                                      log_every=10)
        metrics = pretrain(load_recipe(recipe), work / "run", resume=False, overwrite=False)
    return work, metrics


def test_pretrain_job_trains_evaluates_and_caches_shards(pretrained):
    work, metrics = pretrained
    losses = [loss for _, loss in _losses(work / "run")]
    assert losses[-1] < losses[0] - 0.5
    assert {"eval_mlm_loss", "eval_mlm_accuracy", "eval_perplexity", "eval_nsp_accuracy",
            "eval_mlm_baseline_accuracy"} <= set(metrics)
    assert len(list((work / "cache" / "shards").iterdir())) == 2  # train and eval text, encoded once each
    config = json.loads((work / "run" / "config.json").read_text())
    assert config["architectures"] == ["BertForPreTraining"]


def test_pretraining_on_from_a_checkpoint_takes_model_dropout_or_keeps_its_own(pretrained, corpus, tiny_tokenizer_dir,
                                                                               tmp_path, monkeypatch):
    work, _ = pretrained
    monkeypatch.setenv("BERTCLI_CACHE", str(work / "cache"))
    recipe = tiny_pretrain_recipe(tmp_path / "r.yaml", corpus, tiny_tokenizer_dir, max_steps=1)
    for overrides, expected in [(["model.dropout=0.3"], 0.3), (["model.dropout=null"], 0.0)]:  # null: the checkpoint's
        out = tmp_path / f"run{expected}"
        pretrain(load_recipe(recipe, [f"model.init={work / 'run'}", *overrides]), out, resume=False, overwrite=False)
        config = json.loads((out / "config.json").read_text())
        assert config["hidden_dropout_prob"] == config["attention_probs_dropout_prob"] == expected


def test_evaluate_scores_a_pretrained_model_on_text_as_training_did(pretrained, corpus, tmp_path, cli):
    work, metrics = pretrained
    done = cli("evaluate", str(work / "run"), "--data", str(corpus / "eval.txt"), "--precision", "fp32",
               "--out", str(tmp_path / "m.json"))
    assert done.returncode == 0, done.stderr.decode()
    found = json.loads((tmp_path / "m.json").read_text())
    assert found["task"] == "pretrain"
    for key in ("mlm_loss", "mlm_accuracy", "nsp_accuracy"):  # the same sequences and masks as the run's eval
        assert found[key] == pytest.approx(metrics[f"eval_{key}"], rel=1e-4, abs=1e-6), key


def test_a_pretrained_model_without_its_sentence_head_fills_masks_but_is_not_scored(pretrained, corpus, tmp_path):
    """Filling in [MASK] reads neither the next-sentence head nor the pooler; evaluate scores that head, so it
    must be there (never a score of a head made up at random)."""
    from safetensors.torch import load_file, save_file

    from bertcli import predict
    from bertcli.errors import CheckpointError
    from bertcli.evaluate import evaluate

    work, _ = pretrained
    model = tmp_path / "run"
    shutil.copytree(work / "run", model)
    weights = load_file(model / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith(("cls.seq_relationship.", "bert.pooler."))},
              model / "model.safetensors", metadata={"format": "pt"})
    out = io.StringIO()
    predict.run(model, io.BytesIO(b"the [MASK] begins here .\n"), "stdin", out, precision="fp32")
    assert len(json.loads(out.getvalue())["masks"]) == 1
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: bert.pooler.dense.weight"):
        evaluate(model, corpus / "eval.txt", precision="fp32")
    save_file({k: v for k, v in weights.items() if not k.startswith("cls.predictions.")},
              model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: cls.predictions"):
        predict.run(model, io.BytesIO(b"the [MASK] begins here .\n"), "stdin", io.StringIO(), precision="fp32")


def test_predict_with_a_pretrained_model_fills_in_each_mask(pretrained, cli):
    import torch

    from bertcli.checkpoint import load_checkpoint

    work, _ = pretrained
    lines = ["The [MASK] begins  here, isn't it ?", "[MASK] ends with [MASK] 7 !", "no mask here", " "]
    done = cli("predict", str(work / "run"), "--precision", "fp32", stdin="\n".join(lines).encode() + b"\n")
    assert done.returncode == 2 and b"1 of 4 input line(s)" in done.stderr
    first, second, third, blank = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert "no [MASK] in the line" in third["error"] and blank == {"text": None, "masks": []}
    assert [len(first["masks"]), len(second["masks"])] == [1, 2]
    ck = load_checkpoint(work / "run")
    ck.model.eval()
    for line, answer in ((lines[0], first), (lines[1], second)):
        enc = ck.tokenizer.encode(line)
        ids = torch.tensor([enc.ids])
        with torch.inference_mode():  # every position's logits, the MLM head run unselected
            logits, _ = ck.model(ids, torch.ones_like(ids), torch.tensor([enc.type_ids]))
        probs = logits.float().softmax(-1)
        filled = line
        for candidates, position in zip(answer["masks"], [p for p, i in enumerate(enc.ids) if i == ck.tokenizer.mask_id]):
            top = probs[position].topk(5)
            assert [c["token"] for c in candidates] == [ck.tokenizer.backend.id_to_token(int(i)) for i in top.indices]
            assert [c["score"] for c in candidates] == pytest.approx(top.values.tolist(), abs=1e-5)
            filled = filled.replace("[MASK]", ck.tokenizer.backend.id_to_token(int(top.indices[0])).removeprefix("##"), 1)
        assert answer["text"] == filled  # the line as written (its case, spaces and punctuation), each [MASK] filled in


def _losses(run):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


def _distributed(corpus, tokenizer, tmp_path, steps: int) -> tuple[dict, list[str]]:
    """The environment and the command's arguments of a tiny pretraining run of `steps` (they add --out and a
    batch size)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BERTCLI_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    recipe = tiny_pretrain_recipe(tmp_path / "r.yaml", corpus, tokenizer, max_steps=steps, log_every=1)
    return env, ["pretrain", str(recipe), "--set", "model.dropout=0.0"]


def _one_process(corpus, tokenizer, tmp_path, steps: int, batch: int = 8) -> tuple[dict, list[str]]:
    """That run in one process with a batch of `batch`, into tmp_path/one (the same run split over processes)."""
    env, common = _distributed(corpus, tokenizer, tmp_path, steps)
    one = subprocess.run([sys.executable, "-m", "bertcli", *common, "--out", str(tmp_path / "one"),
                          "--set", f"train.batch_size={batch}"], env=env, capture_output=True, timeout=300)
    assert one.returncode == 0, one.stderr.decode()
    return env, common


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one(corpus, tiny_tokenizer_dir, tmp_path):
    """Over an epoch's end too, where the last batch is smaller: the two processes share that one as well (they
    used to leave it out, and parted from one process at the epoch's end). The batch is chosen from the corpus's
    number of sequences (it depends on the tokenizer trained for the tests) so that there is such a batch."""
    recipe = load_recipe(tiny_pretrain_recipe(tmp_path / "count.yaml", corpus, tiny_tokenizer_dir, max_steps=1))
    task = PretrainTask(load_tokenizer(tiny_tokenizer_dir), recipe.task, recipe.data.max_seq_len)
    sequences = len(task.encode(task.read(recipe.data.train[0]), seed=recipe.train.seed))
    each = next(b for b in (4, 3, 5, 6, 7) if sequences % (2 * b) >= 2)  # a last batch with a share for each
    full = sequences // (2 * each)
    env, common = _one_process(corpus, tiny_tokenizer_dir, tmp_path, steps=full + 4, batch=2 * each)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), "-m", "bertcli", *common, "--out", str(tmp_path / "two"),
                          "--set", f"train.batch_size={each}"], env=env, capture_output=True, timeout=300)
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, full + 5))
    epochs = [[r["epoch"] for r in map(json.loads, (tmp_path / run / "log.jsonl").read_text().splitlines())
               if "loss" in r] for run in ("one", "two")]
    assert epochs[0] == epochs[1] and epochs[0][full] == 1.0  # the smaller batch, step full + 1, ends the epoch
    assert np.allclose([x for _, x in a], [x for _, x in b], rtol=1e-4, atol=1e-5)
    from safetensors.numpy import load_file

    # every parameter's gradient was averaged across the processes (the losses alone barely move
    # when one parameter, such as the tied word embeddings, is updated from half the batch). Adam
    # divides by the gradient's size, so a weight whose gradient is ~0 may step either way on a last-bit
    # difference in the summation order: a few such weights may differ, an unaveraged tensor differs
    # nearly everywhere.
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        apart = ~np.isclose(one[name], two[name], atol=2e-5)
        assert apart.mean() <= 0.01 and np.abs(one[name] - two[name]).max() < 2e-2, (name, apart.mean())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_under_torchrun_match_one_process(corpus, tiny_tokenizer_dir, tmp_path):
    """Two torchrun agents, as on two machines (--nnodes 2, c10d rendezvous on 127.0.0.1), each with its own
    output directory as each machine would have: the losses of one process with the same global batch."""
    env, common = _one_process(corpus, tiny_tokenizer_dir, tmp_path, steps=6)
    endpoint = f"127.0.0.1:{_free_port()}"
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                                "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "two-nodes",
                                "-m", "bertcli", *common, "--out", str(tmp_path / f"node{n}"), "--set",
                                "train.batch_size=4"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
              for n in range(2)]
    errors = [agent.communicate(timeout=300)[1].decode() for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], errors
    written = [n for n in range(2) if (tmp_path / f"node{n}" / "log.jsonl").exists()]
    assert len(written) == 1  # rank 0 writes, on whichever machine it landed
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / f"node{written[0]}")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    assert np.allclose([x for _, x in a], [x for _, x in b], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_killed_node_ends_the_run_with_a_checkpoint_that_resumes(corpus, tiny_tokenizer_dir, tmp_path):
    """Two agents (static rendezvous: node 0 holds rank 0 and the store) writing to one output directory, as
    machines that share a file system do; node 1 is killed mid-run. Node 0's process says so and saves the last
    step both finished (exit 75); the two nodes resume from it, and the run's losses are those of the same two
    nodes never stopped."""
    steps = 150  # node 1 is killed at step 5: the margin for a busy machine
    env, common = _distributed(corpus, tiny_tokenizer_dir, tmp_path, steps=steps)

    def agents(out: str, *extra: str) -> list[subprocess.Popen]:
        port = str(_free_port())
        return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                                  "1", "--node_rank", str(n), "--master_addr", "127.0.0.1", "--master_port", port,
                                  "-m", "bertcli", *common, "--out", str(tmp_path / out),
                                  "--set", "train.batch_size=4", *extra],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
                for n in range(2)]

    whole = agents("whole")
    for agent in whole:
        agent.communicate(timeout=240)
    assert [agent.returncode for agent in whole] == [0, 0]
    first = agents("shared")
    log = tmp_path / "shared" / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 5):
        time.sleep(0.02)
    agent = first[1].pid  # the whole of node 1: its training process (torchrun starts it in a session of its own)
    for child in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():  # and then its agent
        os.kill(int(child), signal.SIGKILL)
    os.kill(agent, signal.SIGKILL)
    err = first[0].communicate(timeout=240)[1].decode()
    first[1].wait()
    stopped = _losses(tmp_path / "shared")[-1][0]
    if stopped == steps:
        pytest.skip("the run ended before node 1 was killed")
    assert first[0].returncode != 0 and "another process of this distributed run went away after step" in err, err[-3000:]
    assert "saved to" in err and (tmp_path / "shared" / "resume.pt").is_file()
    again = agents("shared", "--resume")
    errors = [agent.communicate(timeout=240)[1].decode()[-3000:] for agent in again]
    assert [agent.returncode for agent in again] == [0, 0], errors
    a, b = _losses(tmp_path / "whole"), _losses(tmp_path / "shared")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, steps + 1))
    assert np.allclose([x for _, x in a], [x for _, x in b], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_nodes_without_a_shared_directory_resume_from_rank_0s_checkpoint(corpus, tiny_tokenizer_dir, tmp_path):
    """Each node writes its own --out, as machines without a shared file system do, so only rank 0's holds the
    checkpoint. Stopped by SIGTERM and resumed, rank 0 sends its resume state to the other node, and the run
    logs the losses of one process that was never stopped."""
    env, common = _one_process(corpus, tiny_tokenizer_dir, tmp_path, steps=100)

    def agents(*extra: str) -> list[subprocess.Popen]:
        port = str(_free_port())
        return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                                  "1", "--node_rank", str(n), "--master_addr", "127.0.0.1", "--master_port", port,
                                  "-m", "bertcli", *common, "--out", str(tmp_path / f"node{n}"),
                                  "--set", "train.batch_size=4", *extra],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for n in range(2)]

    first = agents()
    log = tmp_path / "node0" / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 5):
        time.sleep(0.02)
    worker = Path(f"/proc/{first[0].pid}/task/{first[0].pid}/children").read_text().split()[0]
    os.kill(int(worker), signal.SIGTERM)  # rank 0's process, as a scheduler stops a job
    errors = [agent.communicate(timeout=240)[1].decode()[-3000:] for agent in first]
    if _losses(tmp_path / "node0")[-1][0] == 100:
        pytest.skip("the run ended before it was stopped")
    assert (tmp_path / "node0" / "resume.pt").is_file(), errors
    assert not (tmp_path / "node1" / "resume.pt").exists()
    again = agents("--resume")
    errors = [agent.communicate(timeout=240)[1].decode()[-3000:] for agent in again]
    assert [agent.returncode for agent in again] == [0, 0], errors
    assert not (tmp_path / "node1" / "resume.pt").exists()
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "node0")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 101))
    assert np.allclose([x for _, x in a], [x for _, x in b], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_ctrl_c_saves_a_resumable_checkpoint(corpus, tiny_tokenizer_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    recipe = tiny_pretrain_recipe(tmp_path / "r.yaml", corpus, tiny_tokenizer_dir, max_steps=100_000, log_every=1)
    proc = subprocess.Popen([sys.executable, "-m", "bertcli", "pretrain", str(recipe), "--out", str(tmp_path / "run")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    log = tmp_path / "run" / "log.jsonl"
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    assert proc.poll() is None and log.exists(), "training never started"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert b"continue with --resume" in err and b"Traceback" not in err
    assert (tmp_path / "run" / "resume.pt").is_file() and (tmp_path / "run" / "model.safetensors").is_file()


def test_chinese_whole_word_masking_with_jieba(tmp_path, tiny_tokenizer_dir):
    pytest.importorskip("jieba")
    from bertcli.tokenizer import train_tokenizer

    text = "我爱北京天安门。今天天气很好。北京欢迎你。\n\n" * 30
    (tmp_path / "zh.txt").write_text(text, encoding="utf-8")
    tok = train_tokenizer([tmp_path / "zh.txt"], vocab_size=200, min_frequency=1)
    encode_corpus(tok, [tmp_path / "zh.txt"], tmp_path / "s", show_progress=False, segmenter="jieba")
    (shard,) = load_shards(tmp_path / "s", tok)
    first = shard.tokens[shard.sentences[0]:shard.sentences[1]].tolist()
    flags = shard.continues[shard.sentences[0]:shard.sentences[1]].tolist()
    chars = [tok.backend.id_to_token(i) for i in first]
    assert chars[:7] == ["我", "爱", "北", "京", "天", "安", "门"]
    assert flags[:7] == [0, 0, 0, 1, 0, 1, 1]  # 北京 and 天安门 are words
    task = PretrainTask(tok, PretrainOptions(mask_prob=0.3, whole_word_mask=True, short_seq_prob=0.0), 32)
    inst = list(task.encode([shard], seed=1))
    batch = task.collate(inst, list(range(len(inst))))
    for row, row_ids, row_labels in zip(inst, batch["input_ids"], batch["mlm_labels"]):
        _, _, continues = task._sequence(row)
        masked = (row_labels != -100).numpy()
        for p in range(1, len(continues)):
            if continues[p]:
                assert masked[p] == masked[p - 1], "a word was masked in part"


def test_shards_edited_by_hand_are_refused_with_a_message(corpus, tiny_tokenizer_dir, tmp_path, cli):
    """An index that is not an object, token ids of a type bertcli never writes (read as floats they would
    train on noise), and ids beyond the tokenizer's: each one message and exit 2, never a traceback."""
    tok = load_tokenizer(tiny_tokenizer_dir)
    encode_corpus(tok, [corpus / "train.txt"], tmp_path / "s", show_progress=False)
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    for text, message in [("[]", "a JSON list, not an object"),
                          (json.dumps(dict(index, dtype="float16")), "token ids of dtype float16"),
                          (json.dumps(dict(index, dtype="int16")), "token ids of dtype int16")]:
        (tmp_path / "s" / "index.json").write_text(text)
        with pytest.raises(DataError, match=re.escape(message)):
            load_shards(tmp_path / "s", tok)
    (tmp_path / "s" / "index.json").write_text(json.dumps(index))
    tokens = np.memmap(tmp_path / "s" / "00000.tokens.bin", dtype=np.dtype(index["dtype"]), mode="r+")
    tokens[:] = tok.vocab_size + 7  # (each id is checked as a batch reads it)
    tokens.flush()
    recipe = tiny_pretrain_recipe(tmp_path / "r.yaml", corpus, tiny_tokenizer_dir, max_steps=2)
    done = cli("pretrain", str(recipe), "--set", f"data.train={tmp_path / 's'}", "--out", str(tmp_path / "run"))
    err = done.stderr.decode()
    assert done.returncode == 2 and "Traceback" not in err
    assert f"token id {tok.vocab_size + 7} at tokens" in err and "encode the text again" in err


def test_a_masked_lm_checkpoint_from_transformers_fills_masks_and_is_scored_on_text(pretrained, corpus, tmp_path):
    """bert-base-uncased and bert-base-chinese are saved as BertForMaskedLM: no sentence head, no pooler.
    predict fills in [MASK] as transformers does; evaluate scores the masked words alone."""
    transformers = pytest.importorskip("transformers")
    import torch

    from bertcli import predict
    from bertcli.evaluate import evaluate

    work, _ = pretrained
    hf = transformers.BertForMaskedLM.from_pretrained(work / "run").eval()
    hf.save_pretrained(tmp_path / "mlm")
    for name in ("tokenizer.json", "vocab.txt"):
        (tmp_path / "mlm" / name).write_bytes((work / "run" / name).read_bytes())
    saved = json.loads((tmp_path / "mlm" / "config.json").read_text())
    assert saved["architectures"] == ["BertForMaskedLM"]
    del saved["bertcli_task"]  # (transformers keeps bertcli's keys) as a checkpoint from elsewhere
    (tmp_path / "mlm" / "config.json").write_text(json.dumps(saved))
    out = io.StringIO()
    predict.run(tmp_path / "mlm", io.BytesIO(b"the [MASK] begins here .\n"), "stdin", out, precision="fp32")
    answer = json.loads(out.getvalue())
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(work / "run" / "tokenizer.json"))
    enc = tok("the [MASK] begins here .", return_tensors="pt")
    with torch.no_grad():
        probs = hf(**enc).logits[0].softmax(-1)
    position = enc["input_ids"][0].tolist().index(tok.convert_tokens_to_ids("[MASK]"))
    top = probs[position].topk(5)
    assert [c["token"] for c in answer["masks"][0]] == tok.convert_ids_to_tokens(top.indices.tolist())
    assert [c["score"] for c in answer["masks"][0]] == pytest.approx(top.values.tolist(), abs=1e-5)
    metrics = evaluate(tmp_path / "mlm", corpus / "eval.txt", precision="fp32")
    assert metrics["task"] == "pretrain" and "nsp_accuracy" not in metrics
    shutil.copytree(work / "run", tmp_path / "own")  # the same weights as bertcli saved them, scored on MLM alone
    config = json.loads((tmp_path / "own" / "config.json").read_text())
    config["bertcli_task"]["objective"] = "none"
    (tmp_path / "own" / "config.json").write_text(json.dumps(config))
    own = evaluate(tmp_path / "own", corpus / "eval.txt", precision="fp32")
    assert metrics["mlm_loss"] == pytest.approx(own["mlm_loss"], rel=1e-5) and metrics["mlm_loss"] < 5
