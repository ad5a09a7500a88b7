"""Token-level caches end to end: a causal-LM teacher trained here on CPython's reference manual,
its next-token distributions dumped, students trained from them, and the contract of the store:
row t predicts token t + 1, the tokens are kept and checked, K = V is the dense loss step for step,
an interrupted dump resumes to the same store, and bad input ends in one line."""
import json
import os

import numpy as np
import pytest
import torch

from kdcache import dump_teacher, train_student
from kdcache import store as stores
from kdcache.errors import KDCacheError
from kdcache.tokens import models, text
from helpers.cli import one_line, run

SEQ = dict(dataset="pydoc", seq_len=16, max_sequences=40)  # 40 sequences of 16 tokens per split
TRAIN = dict(optimizer="adamw", lr=0.003, weight_decay=0.0, batch_size=8)


@pytest.fixture(scope="module")
def lm_teacher(tmp_path_factory) -> str:
    """lm_small trained for one epoch on pydoc with a BPE of 300 tokens trained on the way."""
    out = tmp_path_factory.mktemp("lm")
    train_student(students=["lm_small"], tokenizer="bpe:300", epochs=1, out=str(out), **SEQ, **TRAIN)
    return "hf:" + os.path.join(out, "lm_small")


@pytest.fixture(scope="module")
def lm_cache(lm_teacher, tmp_path_factory) -> str:
    return dump_teacher(teacher=lm_teacher, topk=8, dtype="float32", out=str(tmp_path_factory.mktemp("c") / "lm.zarr"),
                        **SEQ)


def test_row_t_holds_the_teachers_distribution_over_token_t_plus_1(lm_teacher, lm_cache):
    teacher, _ = models.load_lm(lm_teacher)
    tokenizer = text.load_tokenizer(lm_teacher.removeprefix("hf:"))
    data = text.load_token_split("pydoc", "train", tokenizer, 16, max_sequences=40)
    with stores.open_store(lm_cache) as store:
        attrs = store.get_attrs()
        assert attrs["kind"] == "tokens" and "token t + 1 given tokens 0 .. t" in attrs["tokens"]["alignment"]
        assert attrs["tokens"]["tokenizer"]["sha256"] == tokenizer.sha256()
        tokens = np.asarray(store.array("train/tokens")[:])
        labels = np.asarray(store.array("train/labels")[:])
        indices = np.asarray(store.array("train/topk_indices")[:])
        values = np.asarray(store.array("train/logits")[:])
        assert store.get_attrs("train")["dataset"]["fingerprint"] == data.fingerprint()
    np.testing.assert_array_equal(tokens, data.tokens)
    has = labels != -100
    np.testing.assert_array_equal(has, data.mask)
    np.testing.assert_array_equal(labels[:, :-1][has[:, :-1]], tokens[:, 1:][has[:, :-1]])  # the next token
    with torch.inference_mode():
        logits = teacher(torch.from_numpy(tokens[:4].astype(np.int64))).logits.float()
    top = logits.topk(8, dim=-1)
    np.testing.assert_array_equal(indices[:4].astype(np.int64), top.indices.numpy())
    np.testing.assert_allclose(values[:4], top.values.numpy(), rtol=1e-5, atol=1e-5)  # float32 keeps raw logits


def test_a_sweep_from_the_cache_reports_perplexity_top1_and_agreement(lm_cache, tmp_path):
    rows = train_student(cache=lm_cache, students=["lm_tiny", "lm_small"], baseline=True, epochs=1,
                         alpha_schedule="cos", alpha_start=0.1, alpha=0.5, temperature=1.0, out=str(tmp_path), **TRAIN)
    assert [(r["student"], r["kind"]) for r in rows] == [("lm_tiny", "kd"), ("lm_small", "kd"),
                                                         ("lm_tiny", "baseline"), ("lm_small", "baseline")]
    for r in rows:
        assert 1.0 < r["perplexity"] < 300 + 1 and 0.0 <= r["top1"] <= 100.0 and 0.0 <= r["agreement"] <= 100.0
        assert r["teacher_perplexity"] is not None  # read from the teacher's folder, which the cache names
    assert rows[0]["params"] < rows[1]["params"]
    assert (tmp_path / "summary.png").exists()
    header = (tmp_path / "summary.csv").read_text().splitlines()[0]
    assert header.startswith("student,kind,params,epochs,perplexity,top1,agreement")
    folder = tmp_path / "lm_tiny"
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["kd_loss"] > 0 and "perplexity" in history[0]
    student, _ = models.load_lm(f"hf:{folder}")  # a student folder loads back as a teacher would
    assert student.config.vocab_size == 300 or student.config.vocab_size >= 300
    # a rerun keeps what is trained (--resume) or refuses to overwrite it
    with pytest.raises(KDCacheError, match="already holds a trained student"):
        train_student(cache=lm_cache, students=["lm_tiny"], epochs=1, out=str(tmp_path), **TRAIN)
    again = train_student(cache=lm_cache, students=["lm_tiny"], epochs=1, out=str(tmp_path), resume=True, **TRAIN)
    assert again[0]["perplexity"] == rows[0]["perplexity"]


@pytest.mark.parametrize("loss", ["soft_target", "reverse_kl", "gjsd"])
def test_top_v_targets_train_exactly_as_dense_logits(lm_teacher, tmp_path, loss):
    """K = V: no tail, so the sparse bins are the full distribution and every step matches the dense store's."""
    dense = dump_teacher(teacher=lm_teacher, dtype="float32", out=str(tmp_path / "dense.zarr"), **SEQ)
    vocab = text.load_tokenizer(lm_teacher.removeprefix("hf:")).vocab_size
    full = dump_teacher(teacher=lm_teacher, dtype="float32", topk=vocab, out=str(tmp_path / "topv.zarr"), **SEQ)
    common = dict(students=["lm_tiny"], epochs=2, loss=loss, temperature=2.0, alpha=0.7, **TRAIN)
    a = train_student(cache=dense, out=str(tmp_path / "a"), **common)[0]
    b = train_student(cache=full, out=str(tmp_path / "b"), **common)[0]
    ha = [json.loads(x) for x in (tmp_path / "a" / "lm_tiny" / "metrics.jsonl").read_text().splitlines()]
    hb = [json.loads(x) for x in (tmp_path / "b" / "lm_tiny" / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(ha, hb):
        assert x["kd_loss"] == pytest.approx(y["kd_loss"], rel=1e-4)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-3)


def test_an_interrupted_token_dump_resumes_to_the_uninterrupted_store(lm_teacher, lm_cache, tmp_path, monkeypatch):
    from kdcache.tokens import dump as token_dump

    small = dict(topk=8, dtype="float32", chunk_bytes=1024, batch_size=4, **SEQ)  # 4-sequence blocks: 10 per split
    reference = dump_teacher(teacher=lm_teacher, out=str(tmp_path / "ref.zarr"), **small)
    real = models.load_lm
    calls = {"n": 0}

    def dying(spec):
        model, info = real(spec)
        forward = model.forward

        def stop_after_3(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > 3:
                raise KeyboardInterrupt
            return forward(*args, **kwargs)

        model.forward = stop_after_3
        return model, info

    monkeypatch.setattr(token_dump.models, "load_lm", dying)
    out = str(tmp_path / "resumed.zarr")
    with pytest.raises(KeyboardInterrupt):
        dump_teacher(teacher=lm_teacher, out=out, **small)
    assert stores.state(out) == "partial"
    monkeypatch.setattr(token_dump.models, "load_lm", real)
    dump_teacher(teacher=lm_teacher, out=out, resume=True, **small)
    with stores.open_store(out) as a, stores.open_store(reference) as b:
        for split in ("train", "test"):
            for name in b.array_names(split):
                np.testing.assert_array_equal(np.asarray(a.array(f"{split}/{name}")[:]),
                                              np.asarray(b.array(f"{split}/{name}")[:]), err_msg=f"{split}/{name}")


def test_a_two_process_token_dump_equals_the_one_process_dump(lm_teacher, tmp_path):
    from helpers.torchrun import kdcache

    args = ["dump-teacher", "--teacher", lm_teacher, "--dataset", "pydoc", "--seq-len", "16", "--max-sequences", "40",
            "--topk", "8", "--dtype", "float32", "--chunk-bytes", "1024", "--batch-size", "4"]
    one = kdcache(args + ["--out", str(tmp_path / "one.zarr")])
    assert one.returncode == 0, one.stderr
    two = kdcache(args + ["--out", str(tmp_path / "two.zarr")], nproc=2)
    assert two.returncode == 0, two.stderr
    with stores.open_store(str(tmp_path / "two.zarr")) as a, stores.open_store(str(tmp_path / "one.zarr")) as b:
        for split in ("train", "test"):
            assert a.get_attrs(split)["checksums"] == b.get_attrs(split)["checksums"]
            for name in b.array_names(split):
                np.testing.assert_array_equal(np.asarray(a.array(f"{split}/{name}")[:]),
                                              np.asarray(b.array(f"{split}/{name}")[:]), err_msg=f"{split}/{name}")


# --- bad input: one line, exit status 2, nothing written ------------------------------------------

def test_a_nan_lm_training_loss_stops_training_naming_the_epoch_and_step(tmp_path):
    with pytest.raises(KDCacheError, match=r"loss of lm_tiny became nan in epoch 1, step \d+ of 5; lower --lr"):
        train_student(students=["lm_tiny"], tokenizer="bpe:300", epochs=1, out=str(tmp_path), optimizer="sgd", lr=1e30,
                      batch_size=8, **SEQ)


def test_a_sequence_longer_than_the_teachers_context_is_refused(lm_teacher, tmp_path, capsys):
    code, _, err = run(capsys, "dump-teacher", "--teacher", lm_teacher, "--dataset", "pydoc", "--seq-len", "64",
                       "--out", str(tmp_path / "x.zarr"))
    assert code == 2 and "longer than teacher" in one_line(err) and "context of 16" in err
    assert not os.path.exists(tmp_path / "x.zarr") and not os.path.exists(tmp_path / "x.zarr.partial")


def test_a_tokenizer_other_than_the_teachers_is_refused(lm_teacher, tmp_path, capsys):
    code, _, err = run(capsys, "dump-teacher", "--teacher", lm_teacher, "--dataset", "pydoc", "--seq-len", "16",
                       "--tokenizer", "bpe:320", "--out", str(tmp_path / "x.zarr"))
    assert code == 2 and "not the teacher's own tokenizer" in one_line(err)
    assert not os.path.exists(tmp_path / "x.zarr.partial")


def test_a_tokenizer_larger_than_the_teachers_vocabulary_is_refused(lm_teacher, tmp_path, capsys):
    folder = tmp_path / "bare"  # the teacher without its tokenizer: --tokenizer must come from elsewhere
    teacher, _ = models.load_lm(lm_teacher)
    teacher.save_pretrained(folder)
    code, _, err = run(capsys, "dump-teacher", "--teacher", f"hf:{folder}", "--dataset", "pydoc", "--seq-len", "16",
                       "--tokenizer", "bpe:400", "--out", str(tmp_path / "x.zarr"))
    assert code == 2 and "do not belong together" in one_line(err)


def test_a_student_of_another_vocabulary_is_refused(lm_cache, tmp_path, capsys):
    from transformers import GPT2Config

    GPT2Config(vocab_size=500, n_positions=16, n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "cfg")
    code, _, err = run(capsys, "train-student", "--cache", lm_cache, "--student", f"hf:{tmp_path / 'cfg'}",
                       "--epochs", "1", "--out", str(tmp_path / "o"))
    assert code == 2 and "vocabulary of 500 tokens" in one_line(err)


def test_a_dataset_of_other_tokens_is_refused(lm_cache, tmp_path, capsys):
    code, _, err = run(capsys, "train-student", "--cache", lm_cache, "--student", "lm_tiny", "--dataset", "pydoc",
                       "--seq-len", "16", "--max-sequences", "30", "--epochs", "1", "--out", str(tmp_path / "o"))
    assert code == 2 and "targets of other tokens" in one_line(err)
    assert not os.path.exists(tmp_path / "o" / "lm_tiny")


@pytest.mark.parametrize("place", ["memory", "stream"])
def test_a_token_cache_missing_an_array_is_one_line_naming_it(lm_cache, tmp_path, capsys, place):
    import shutil

    path = str(tmp_path / "lm.zarr")
    shutil.copytree(lm_cache, path)
    shutil.rmtree(os.path.join(path, "train", "topk_indices"))
    code, _, err = run(capsys, "train-student", "--cache", path, "--student", "lm_tiny", "--epochs", "1",
                       "--targets-in", place, "--out", str(tmp_path / "o"))
    assert code == 2 and "train/topk_indices is missing from the store" in one_line(err)
    assert f"kdcache verify {path}" in err


@pytest.mark.parametrize("argv, says", [
    (["--loss", "dkd"], "is an image loss"),
    (["--feature", "h.0=x"], "applies to image caches"),
])
def test_image_options_on_a_token_cache_are_refused(lm_cache, tmp_path, capsys, argv, says):
    code, _, err = run(capsys, "train-student", "--cache", lm_cache, "--student", "lm_tiny", *argv,
                       "--out", str(tmp_path / "o"))
    assert code == 2 and says in one_line(err)


def test_an_image_student_on_a_token_cache_and_an_lm_student_on_images_are_refused(lm_cache, fp32_cache, tmp_path,
                                                                                   capsys):
    code, _, err = run(capsys, "train-student", "--cache", lm_cache, "--student", "cnn_tiny", "--out", str(tmp_path / "a"))
    assert code == 2 and "unknown language model 'cnn_tiny'" in one_line(err)
    code, _, err = run(capsys, "train-student", "--cache", fp32_cache, "--student", "lm_tiny", "--out", str(tmp_path / "b"))
    assert code == 2 and "lm_tiny" in one_line(err)


def test_activations_and_views_on_a_text_dataset_are_refused(lm_teacher, tmp_path, capsys):
    code, _, err = run(capsys, "dump-teacher", "--teacher", lm_teacher, "--dataset", "pydoc", "--seq-len", "16",
                       "--activation", "transformer.h.0", "--out", str(tmp_path / "x.zarr"))
    assert code == 2 and "--activation applies to image datasets" in one_line(err)


def test_streamed_targets_are_the_in_memory_targets_and_train(lm_teacher, tmp_path):
    """--targets-in stream: blocks read as batches need them give the rows the in-memory table gives."""
    from kdcache.config import TrainConfig
    from kdcache.tokens.train import TokenSetup

    lm_cache = dump_teacher(teacher=lm_teacher, topk=8, dtype="float32", chunk_bytes=1024,  # blocks of 4 sequences
                            out=str(tmp_path / "blocks.zarr"), **SEQ)

    memory = TokenSetup(TrainConfig(cache=lm_cache, students=["lm_tiny"], targets_in="memory"), torch.device("cpu"))
    streamed = TokenSetup(TrainConfig(cache=lm_cache, students=["lm_tiny"], targets_in="stream", buffer_blocks=1),
                          torch.device("cpu"))
    assert streamed.train.stream is not None and memory.train.targets is not None
    assert streamed.train.stream.block_rows < 10
    rows = torch.tensor([39, 0, 17, 5, 38, 1])  # several blocks, out of order
    for a, b in zip(memory.train.batch(rows), streamed.train.batch(rows)):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        else:
            for x, y in zip((a.values, a.indices, a.logsumexp, a.log_tail), (b.values, b.indices, b.logsumexp, b.log_tail)):
                torch.testing.assert_close(x, y, rtol=0, atol=0)
    order = [r.tolist() for r in streamed.train.order(8, torch.Generator().manual_seed(0), 1)]
    assert sorted(i for batch in order for i in batch) == list(range(len(streamed.train)))  # each sequence once
    row = train_student(cache=lm_cache, students=["lm_tiny"], epochs=1, targets_in="stream", out=str(tmp_path / "o"), **TRAIN)[0]
    assert 1.0 < row["perplexity"] < 400
