"""`dump-teacher` on a text dataset: a causal LM's next-token distributions, one row per sequence.

text -> tokenizer -> sequences [N, L] with their target mask (tokens/text.py) -> teacher
(inference mode) -> logits [B, L, V] -> LogitCodec (top-k + exact tail, or dense) -> blocks of
sequences -> store. The store machinery is the image dump's (kdcache/dump.py `_dump`): blocks
resumable and dealt to torchrun ranks, checksums, the complete flag last.

Layout of a split (the position axis takes the place of the views axis of an image store):
    logits, topk_indices, logsumexp, log_tail   [N, L, ...]   row t: the teacher's distribution over
                                                              token t + 1 given tokens 0 .. t
    tokens                                      [N, L]        the ids the teacher was run on
    labels                                      [N, L] int32  token t + 1 where position t has a target, else -100
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from kdcache import encodings
from kdcache import store as stores
from kdcache.config import DumpConfig
from kdcache.data import loader as data_loader
from kdcache.distributed import autocast_dtype
from kdcache.errors import KDCacheError
from kdcache.progress import Progress
from kdcache.store import writer
from kdcache.tokens import models, text

ALIGNMENT = "row t of a sequence: the teacher's distribution over token t + 1 given tokens 0 .. t"
LOGIT_BATCH_BYTES = 1 << 28  # float32 logits of one teacher batch: sequences per batch are capped to fit


class Sequences(torch.utils.data.Dataset):
    """Sequence i of a TokenSplit -> (tokens [L] int64, i)."""

    def __init__(self, data: text.TokenSplit):
        self.tokens = torch.from_numpy(np.ascontiguousarray(data.tokens, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i):
        return self.tokens[i], i


def tokenizer_for(cfg, teacher_path: str | None) -> text.Tokenizer:
    """--tokenizer, or the one saved beside the teacher; one given that differs from the teacher's own is refused."""
    own = None
    if teacher_path is not None:
        folder = teacher_path.removeprefix("hf:")
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            own = text.load_tokenizer(folder)
    if cfg.tokenizer is None:
        if own is None:
            raise KDCacheError(f"teacher {cfg.teacher} has no tokenizer.json beside it; pass --tokenizer "
                               "(tokenizer.json, or the folder holding it)")
        return own
    given = text.load_tokenizer(cfg.tokenizer, corpus=cfg.dataset, root=cfg.data_root)
    if own is not None and given.sha256() != own.sha256():
        raise KDCacheError(f"--tokenizer {cfg.tokenizer} is not the teacher's own tokenizer (saved beside it); the "
                           "teacher's distributions are over its own tokens: drop --tokenizer")
    return given


class TokenDump:
    """What a dump of a text dataset runs and writes (see the module doc); the job `_dump` runs."""

    room_hint = "choose another --out, or store --topk K (top-32 is ~40x smaller than float16 at 2k tokens)"

    def __init__(self, cfg: DumpConfig, device):
        self.cfg, self.device = cfg, device
        for flag, given in (("--activation", cfg.activations), ("--views", cfg.views > 1), ("--sample", cfg.sample),
                            ("--mix", cfg.mix), ("--augment", cfg.augment != "none")):
            if given:
                raise KDCacheError(f"{flag} applies to image datasets; a token cache stores next-token distributions: "
                                   f"drop {flag}")
        teacher, info = models.load_lm(cfg.teacher)
        self.teacher = teacher.to(device).eval()
        models.check_context(teacher, cfg.seq_len, f"teacher {cfg.teacher}")
        self.tokenizer = tokenizer_for(cfg, cfg.teacher)
        vocab = info["vocab_size"]
        if self.tokenizer.vocab_size > vocab:
            raise KDCacheError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but teacher {cfg.teacher} scores "
                               f"{vocab}: they do not belong together; pass the teacher's own tokenizer")
        self.info = dict(info, num_classes=vocab)
        self.splits = [text.load_token_split(cfg.dataset, s, self.tokenizer, cfg.seq_len, packing=cfg.packing,
                                             root=cfg.data_root, max_sequences=cfg.max_sequences) for s in cfg.splits]
        self.codec = encodings.LogitCodec(cfg.dtype, cfg.topk, vocab, indices=cfg.topk_indices).validate()
        self.batch = max(1, min(cfg.batch_size, LOGIT_BATCH_BYTES // (4 * cfg.seq_len * vocab)))

    def attrs(self) -> dict:
        return {"kind": "tokens", "views": 1, "activations": {}, "augment": None,
                "tokens": {"alignment": ALIGNMENT, "seq_len": self.cfg.seq_len, "packing": self.cfg.packing,
                           "tokenizer": self.tokenizer.describe()}}

    def specs(self, data: text.TokenSplit) -> dict:
        n, length = len(data), data.seq_len
        specs = {name: ((n, length) + tail, dtype) for name, (tail, dtype) in self.codec.arrays().items()}
        specs["tokens"] = ((n, length), encodings.index_dtype(self.info["num_classes"]))
        return specs

    def estimate_bytes(self) -> int:
        return sum(math.prod(shape) * np.dtype(dtype).itemsize + 4 * len(data) * data.seq_len
                   for data in self.splits for shape, dtype in self.specs(data).values())

    def batch_samples(self, data) -> int:
        return self.batch

    def prepare_split(self, store, data: text.TokenSplit) -> None:
        stores.create_split(store, data.split, self.specs(data), data.labels().astype(np.int32), self.cfg.chunk_bytes,
                            {"dataset": data.describe(), "transform": None, "views": 1})

    def write_blocks(self, store, data: text.TokenSplit, block: int, todo: list, record, keys) -> None:
        split, n = data.split, len(data)
        arrays = {f"{split}/{key}": store.array(f"{split}/{key}") for key in keys}
        rows = [i for b in todo for i in range(b * block, min((b + 1) * block, n))]
        cuda = self.device.type == "cuda"
        loader = data_loader(torch.utils.data.Subset(Sequences(data), rows), batch_size=self.batch, shuffle=False,
                             num_workers=self.cfg.num_workers, pin_memory=cuda)

        def batches():
            amp = autocast_dtype(self.cfg, self.device)  # as the image dump: only on CUDA, only when the store rounds
            with (Progress(n, f"dump {split}", unit="sequences", initial=n - len(rows)) as bar, torch.inference_mode(),
                  torch.autocast("cuda", dtype=amp or torch.float16, enabled=amp is not None)):
                done = 0
                for tokens, _ in loader:
                    b = len(tokens)
                    logits = self.teacher(tokens.to(self.device, non_blocking=True)).logits.float()  # [B, L, V]
                    encoded = encodings.encode_checked(self.codec, logits, rows[done],
                                                       allow_nonfinite=self.cfg.allow_nonfinite)
                    host, ready = writer.to_host({f"{split}/{k}": t for k, t in encoded.items()}, cuda)
                    host[f"{split}/tokens"] = tokens  # ids < V: the block buffer's unsigned dtype holds them
                    yield host, ready
                    done += b
                    bar.update(b)

        writer.write_blocks(arrays, batches(), block_rows=block, blocks=todo, record=record)
