"""Hugging Face Trainer: a transformers image classifier trained one epoch from a cache equals online
KD per step; the index column survives remove_unused_columns; data without it is refused."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: nothing here may reach the network

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import ResNetConfig, ResNetForImageClassification, Trainer, TrainingArguments  # noqa: E402

from kdcache import losses  # noqa: E402
from kdcache.data import load_split  # noqa: E402
from kdcache.errors import KDCacheError  # noqa: E402
from kdcache.integrations.hf import DistillationTrainer, IndexCollator, indexed  # noqa: E402
from kdcache.models import build_teacher  # noqa: E402


class Pixels(torch.utils.data.Dataset):
    """digits as the dicts a transformers image model takes."""

    def __init__(self, split):
        self.data = load_split("digits", split).dataset

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return {"pixel_values": x, "labels": y}


def student():
    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                          num_labels=10)
    return ResNetForImageClassification(config)


def args(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=96,
                             learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", seed=0, use_cpu=True,
                             report_to="none", save_strategy="no", logging_strategy="no", dataloader_num_workers=0,
                             disable_tqdm=True)


def test_one_epoch_from_the_cache_equals_online_kd_per_step(teacher_ckpt, fp32_cache, tmp_path):
    teacher = build_teacher(teacher_ckpt, num_classes=10)[0].eval()
    online_steps, cached_steps = [], []

    class OnlineKD(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            out = model(**inputs)
            with torch.no_grad():
                t = teacher(inputs["pixel_values"])
            loss = torch.lerp(F.cross_entropy(out.logits, labels), losses.soft_target(out.logits, t, 4.0), 0.5)
            online_steps.append(loss.item())
            return (loss, out) if return_outputs else loss

    class Recorded(DistillationTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            cached_steps.append((loss[0] if return_outputs else loss).item())
            return loss

    OnlineKD(model=student(), args=args(tmp_path / "a"), train_dataset=Pixels("train")).train()
    Recorded(model=student(), args=args(tmp_path / "b"), train_dataset=indexed(Pixels("train")),
             teacher=fp32_cache, kd_loss="soft_target", weight=0.5, temperature=4.0).train()
    assert len(cached_steps) == len(online_steps) == 15  # 1437 / 96, with remove_unused_columns on (the default)
    assert cached_steps == pytest.approx(online_steps, rel=1e-5)


def test_evaluation_is_distilled_from_the_cached_test_split(fp32_cache, tmp_path):
    def eval_loss(**options):
        return DistillationTrainer(model=student(), args=args(tmp_path), eval_dataset=indexed(Pixels("test")),
                                   teacher=fp32_cache, weight=0.5, **options).evaluate()["eval_loss"]

    ce = F.cross_entropy(student().eval()(torch.stack([Pixels("test")[i]["pixel_values"] for i in range(360)])).logits,
                         torch.as_tensor(load_split("digits", "test").labels)).item()
    assert eval_loss(eval_split=None) == pytest.approx(ce, rel=1e-4)  # no cached split: the task loss
    assert abs(eval_loss() - ce) > 1e-2  # the test split's cached targets enter the loss


def test_index_collator_keeps_the_index_beside_any_collate():
    collate = IndexCollator(lambda features: {"n": len(features), "keys": sorted(features[0])})
    batch = collate([{"pixel_values": 0, "index": 7}, {"pixel_values": 1, "index": 3}])
    assert batch["keys"] == ["pixel_values"] and batch["index"].tolist() == [7, 3]


def test_a_dataset_without_the_index_column_is_refused_before_training(fp32_cache, tmp_path):
    trainer = DistillationTrainer(model=student(), args=args(tmp_path), train_dataset=Pixels("train"),
                                  teacher=fp32_cache)
    with pytest.raises(KDCacheError, match=r"no 'index' column.*indexed\(dataset\)"):
        trainer.train()
    wrong = DistillationTrainer(model=student(), args=args(tmp_path), train_dataset=indexed(Pixels("test")),
                                teacher=fp32_cache)
    with pytest.raises(KDCacheError, match="1437 samples.*has 360"):
        wrong.train()
