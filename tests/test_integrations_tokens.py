"""Token caches in your own loop and the Hugging Face Trainer: a batch's teacher is one gather of the
stored rows, the cache's own sequences come with shifted labels, batches of other tokens are refused,
and the Trainer's loss is (1 - alpha) * CE + alpha * token_kd over the positions with a target."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: nothing here may reach the network

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments  # noqa: E402

from helpers.synthetic_store import structured_logits, write_store  # noqa: E402
from kdcache import losses  # noqa: E402
from kdcache import store as stores  # noqa: E402
from kdcache.encodings import LogitCodec, TopK  # noqa: E402
from kdcache.errors import KDCacheError  # noqa: E402
from kdcache.integrations.tokens import TokenDistillationTrainer, TokenTeacher, sequences, token_loss  # noqa: E402
from kdcache.targets import SplitTargets  # noqa: E402

SEQ_LEN, SEQUENCES, TOPK = 16, 32, 8
CORPUS = dict(dataset="pydoc", seq_len=SEQ_LEN, max_sequences=SEQUENCES)


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict:
    """{"topk": top-8 float32, "dense": float32} caches of an lm_tiny teacher trained 1 epoch on pydoc."""
    from kdcache import dump_teacher, train_student

    out = tmp_path_factory.mktemp("tokens")
    train_student(tokenizer="bpe:300", students=["lm_tiny"], epochs=1, optimizer="adamw", lr=0.003, batch_size=16,
                  out=str(out / "t"), **CORPUS)
    teacher = f"hf:{out / 't' / 'lm_tiny'}"
    return {"topk": dump_teacher(teacher=teacher, topk=TOPK, dtype="float32", out=str(out / "k.zarr"), **CORPUS),
            "dense": dump_teacher(teacher=teacher, dtype="float32", out=str(out / "d.zarr"), **CORPUS)}


def stored_targets(path: str, split: str = "train") -> SplitTargets:
    with stores.open_store(path) as store:
        return SplitTargets(store, split)


def stored_rows(path: str, rows: torch.Tensor, split: str = "train"):
    """The teacher of `rows` as SplitTargets decodes the whole split: a TopK [B, L, K] or dense [B, L, V]."""
    full = stored_targets(path, split).logits
    if isinstance(full, TopK):
        return TopK(full.values[rows], full.indices[rows], full.logsumexp[rows], full.log_tail[rows], full.num_classes)
    return full[rows]


def student(vocab: int) -> GPT2LMHeadModel:
    """A tiny GPT-2 without dropout: a training-mode forward equals the one computed by hand."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=SEQ_LEN, n_embd=16, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))


def args(tmp_path) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8,
                             per_device_eval_batch_size=8, learning_rate=0.05, optim="sgd",
                             lr_scheduler_type="constant", seed=0, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True)


def test_a_batch_of_sequences_is_one_gather_of_the_stored_rows(caches):
    rows = torch.tensor([5, 0, 31, 5])
    teacher = TokenTeacher(caches["topk"])
    stored = stored_targets(caches["topk"])
    got, want = teacher(rows), stored_rows(caches["topk"], rows)
    assert isinstance(got, TopK) and got.values.shape == (4, SEQ_LEN, TOPK) and got.num_classes == teacher.vocab_size
    for name in ("values", "indices", "logsumexp", "log_tail"):
        assert torch.equal(getattr(got, name), getattr(want, name))
    assert torch.equal(teacher.labels, stored.labels) and teacher.labels.dtype == torch.int64
    assert teacher.tokens.shape == (SEQUENCES, SEQ_LEN) and teacher.tokens.dtype == torch.int64
    assert (teacher.seq_len, teacher.vocab_size) == (SEQ_LEN, 300)
    assert teacher.tokenizer["vocab_size"] == 300 and len(teacher.tokenizer["sha256"]) == 64

    dense = TokenTeacher(caches["dense"], "test")
    assert torch.equal(dense(rows[:3]), stored_rows(caches["dense"], rows[:3], "test"))
    assert dense(rows[:3]).shape == (3, SEQ_LEN, 300)


def test_sequences_are_the_cached_tokens_with_labels_already_shifted(caches):
    teacher = TokenTeacher(caches["topk"])
    item = sequences(teacher)[7]
    assert item["index"] == 7 and torch.equal(item["input_ids"], teacher.tokens[7])
    y, x = item["next_token_labels"], item["input_ids"]
    target = y != -100
    assert target.any() and torch.equal(y[:-1][target[:-1]], x[1:][target[:-1]]) and y[-1] == -100
    test = sequences(caches["topk"], "test")
    assert len(test) == len(TokenTeacher(caches["topk"], "test")) and "labels" not in test[0]


def test_check_batch_refuses_tokens_the_teacher_did_not_read(caches):
    teacher = TokenTeacher(caches["topk"])
    rows = torch.tensor([3, 4])
    tokens, labels = teacher.tokens[rows], teacher.labels[rows]
    teacher.check_batch(rows, tokens, labels)
    after = labels == -100  # right padding: positions after a row's last target decide no loss
    after[:, : int((labels != -100).nonzero()[:, 1].max()) + 1] = False
    teacher.check_batch(rows, torch.where(after, 299, tokens))
    with pytest.raises(KDCacheError, match=r"batch item 0 are not row 3 .*shifted by one"):
        teacher.check_batch(rows, torch.roll(tokens, 1, dims=1))
    with pytest.raises(KDCacheError, match=r"batch item 0 are not row 4 "):
        teacher.check_batch(rows.flip(0), tokens)
    with pytest.raises(KDCacheError, match=r"labels of batch item 0 \(row 3 .*already shifted"):
        teacher.check_batch(rows, tokens, tokens)  # HF's convention: labels = input_ids
    with pytest.raises(KDCacheError, match=r"input_ids are \[2, 15\]"):
        teacher.check_batch(rows, tokens[:, :-1])


def test_trainer_loss_is_lerp_of_ce_and_token_kd_over_the_target_positions(caches, tmp_path):
    first = []

    class Recorded(TokenDistillationTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            first.append((dict(inputs), loss.item()))
            return loss

    teacher = TokenTeacher(caches["topk"])
    Recorded(model=student(teacher.vocab_size), args=args(tmp_path), train_dataset=sequences(teacher),
             teacher=teacher, kd_loss="soft_target", weight=0.75, temperature=2.0).train()
    assert len(first) == 3  # remove_unused_columns (on by default) kept index and next_token_labels
    inputs, loss = first[0]
    assert sorted(inputs) == ["index", "input_ids", "next_token_labels"]
    logits = student(teacher.vocab_size)(input_ids=inputs["input_ids"]).logits  # the state before the first step
    labels = teacher.labels[inputs["index"]]
    mask = labels != -100
    ce = F.cross_entropy(logits[mask], labels[mask])
    kd = losses.token_kd(logits, stored_rows(caches["topk"], inputs["index"]), loss="soft_target", T=2.0, mask=mask)
    assert loss == pytest.approx((0.25 * ce + 0.75 * kd).item(), rel=1e-5, abs=1e-6)


def test_compute_loss_of_a_dense_cache_is_token_loss_by_parts(caches, tmp_path):
    teacher = TokenTeacher(caches["dense"])
    trainer = TokenDistillationTrainer(model=student(teacher.vocab_size), args=args(tmp_path), teacher=teacher,
                                       kd_loss="reverse_kl", weight=0.5)
    batch = trainer.data_collator([sequences(teacher)[i] for i in (2, 9, 30)])
    loss = trainer.compute_loss(trainer.model.train(), batch)
    logits = trainer.model(input_ids=batch["input_ids"]).logits
    parts = token_loss(logits, batch["next_token_labels"], teacher(batch["index"]), kd_loss="reverse_kl", weight=0.5)
    mask = batch["next_token_labels"] != -100
    kd = losses.token_kd(logits, stored_rows(caches["dense"], batch["index"]), loss="reverse_kl", mask=mask)
    assert parts["kd_loss"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert loss.item() == pytest.approx((0.5 * parts["task_loss"] + 0.5 * kd).item(), rel=1e-5, abs=1e-6)


def test_evaluation_is_distilled_from_the_cached_test_split(caches, tmp_path):
    test = sequences(caches["topk"], "test")

    def eval_loss(**options):
        return TokenDistillationTrainer(model=student(300), args=args(tmp_path), eval_dataset=test,
                                        teacher=caches["topk"], **options).evaluate()["eval_loss"]

    model = student(300).eval()
    batches = torch.arange(len(test)).split(8)  # the Trainer's mean of per-batch losses
    ce = sum(token_loss(model(input_ids=test.tokens[b]).logits, test.labels[b])["loss"].item() for b in batches)
    assert eval_loss(eval_split=None) == pytest.approx(ce / len(batches), rel=1e-4)
    assert abs(eval_loss() - ce / len(batches)) > 1e-2  # the test split's cached targets enter the loss


def test_data_without_the_cache_columns_is_refused(caches, tmp_path):
    teacher = TokenTeacher(caches["topk"])
    hf_style = [{"input_ids": t, "labels": t} for t in teacher.tokens]
    trainer = TokenDistillationTrainer(model=student(300), args=args(tmp_path), train_dataset=hf_style, teacher=teacher)
    with pytest.raises(KDCacheError, match=r"no 'next_token_labels', 'index' column.*sequences\(teacher\)"):
        trainer.train()
    other = TokenDistillationTrainer(model=student(300), args=args(tmp_path), teacher=teacher,
                                     train_dataset=sequences(caches["topk"], "test"))  # the test split's sequences
    with pytest.raises(KDCacheError, match=r"input_ids of batch item \d+ are not row \d+ of split 'train'"):
        other.train()
    batch = trainer.data_collator([{**sequences(teacher)[0], "labels": teacher.tokens[0]}])
    with pytest.raises(KDCacheError, match="'labels' column, which a causal LM shifts"):
        trainer.compute_loss(trainer.model, batch)
    with pytest.raises(KDCacheError, match="kd_loss 'dkd' is not a token loss"):
        TokenDistillationTrainer(model=student(300), args=args(tmp_path), teacher=teacher, kd_loss="dkd")


def test_an_image_cache_is_refused(tmp_path):
    logits, labels = structured_logits(8, 10)
    path = write_store(str(tmp_path / "image.zarr"), logits, labels, LogitCodec("float32", None, 10))
    with pytest.raises(KDCacheError, match="holds image targets.*plain.Teacher"):
        TokenTeacher(path)
    with pytest.raises(KDCacheError, match="holds image targets"):
        sequences(path)
