"""`train-student` on token sequences: causal-LM students from a token cache (or plain LM training).

cache (tokens, labels, next-token targets [N, L, ...]; tokens/dump.py) -> batches of sequences
-> student(tokens).logits [B, L, V] -> (1 - alpha) * CE(next tokens) + alpha * token_kd(targets)
over the positions that carry a target -> held-out perplexity, next-token top-1 and agreement
with the teacher -> OUT/<student>/ (save_pretrained folder, metrics.jsonl), OUT/summary.csv.

Without --cache it trains a plain LM on a text dataset (the teacher, or a baseline). With a cache
the sequences come from the cache itself: it stores the token ids its targets were computed on. A
--dataset given with a cache is tokenized with the cache's tokenizer and must give those same
tokens (the fingerprint of tokens and masks), or training is refused.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kdcache import losses
from kdcache import store as stores
from kdcache.config import TrainConfig, as_dict
from kdcache.encodings import LogitCodec, TopK
from kdcache.errors import KDCacheError
from kdcache.progress import Progress, log
from kdcache.schedules import Schedule
from kdcache.targets import SplitTargets, StreamedSplit, choose_place
from kdcache.tokens import models, text
from kdcache.train import LOSS_PARTS, lr_factor, make_optimizer

SUMMARY_COLUMNS = ["student", "kind", "params", "epochs", "perplexity", "top1", "agreement", "teacher_perplexity",
                   "teacher_top1", "tokens_per_s", "seconds", "folder"]


@dataclass
class TokenData:
    """One split as training sees it: tokens [N, L] and labels [N, L] (next token, -100: no target),
    and the teacher's targets when there is a cache: in memory (SplitTargets), or read block by
    block as batches need them (StreamedSplit, --targets-in stream: larger than memory)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    targets: SplitTargets | None = None
    stream: StreamedSplit | None = None
    buffer_blocks: int = 8

    def __post_init__(self):
        self._blocks: dict = {}  # streamed blocks kept, oldest first: the sampler's window of them

    def __len__(self) -> int:
        return len(self.tokens)

    def order(self, batch_size: int, generator: torch.Generator, epoch: int):
        """This epoch's batches of sequence indices: shuffled, or (streamed) whole blocks shuffled in
        windows of --buffer-blocks, so each block is read once per epoch."""
        if self.stream is None:
            return torch.randperm(len(self), generator=generator).split(batch_size)
        sampler = self.stream.sampler(batch_size, seed=int(torch.randint(2**31, (1,), generator=generator)))
        sampler.set_epoch(epoch)
        return [torch.as_tensor(b, dtype=torch.int64) for b in sampler]

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, object]:
        teacher = None
        if self.targets is not None:
            picked = {k: t.index_select(0, rows) for k, t in self.targets.tables.items()}
            teacher = self.targets.codec.decode(picked)  # TopK [B, L, K] or dense [B, L, V]
        elif self.stream is not None:
            teacher = self.stream.codec.decode(self._streamed(rows))
        return self.tokens.index_select(0, rows), self.labels.index_select(0, rows), teacher

    def _streamed(self, rows: torch.Tensor) -> dict:
        """The stored target arrays of `rows` [B] as [B, L, ...], from their blocks (each read once
        while it stays in the window; every block checked against its checksum as it is read)."""
        per_block, length = self.stream.block_rows, self.stream.views
        blocks, within = (rows // per_block).tolist(), (rows % per_block).tolist()
        needed = dict.fromkeys(blocks)
        for b in needed:
            if b not in self._blocks:
                self._blocks[b] = {k: t.unflatten(0, (-1, length)) for k, t in self.stream.load_block(b)["logits"].items()}
        for b in [b for b in self._blocks if b not in needed][: max(0, len(self._blocks) - self.buffer_blocks - 1)]:
            del self._blocks[b]  # the oldest first; never a block this batch reads
        return {k: torch.stack([self._blocks[b][k][r] for b, r in zip(blocks, within)])
                for k in self._blocks[blocks[0]]}


def is_token_cache(path: str) -> bool:
    with stores.open_store(path) as store:
        return store.get_attrs().get("kind") == "tokens"


class TokenSetup:
    """What every student of a token run shares: the sequences, the vocabulary, the teacher's targets."""

    def __init__(self, cfg: TrainConfig, device):
        self.cfg, self.device = cfg, device
        if cfg.teacher:
            raise KDCacheError("online KD of language models is not offered: dump the teacher once "
                               "(kdcache dump-teacher --teacher hf:DIR --dataset text:...) and pass --cache")
        if cfg.features:
            raise KDCacheError("--feature applies to image caches; token caches hold next-token distributions only")
        self.teacher_meta = None
        if cfg.cache:
            self._from_cache(cfg)
        else:
            self.mode = "plain"
            if not text.is_text_dataset(cfg.dataset):
                raise KDCacheError(f"language-model students train on text: pass --dataset pydoc, text:FILE, "
                                   f"jsonl:FILE or hfds:PATH (got {cfg.dataset}), or --cache of a token store")
            if cfg.tokenizer is None:
                raise KDCacheError("plain LM training needs --tokenizer (tokenizer.json, a folder holding one, or "
                                   "bpe:N to train one on the train split)")
            self.tokenizer = text.load_tokenizer(cfg.tokenizer, corpus=cfg.dataset, root=cfg.data_root)
            self.vocab, self.seq_len, self.eos_id = self.tokenizer.vocab_size, cfg.seq_len, self.tokenizer.eos_id
            self.train, self.test = (self._tokenized(cfg, s) for s in (cfg.train_split, cfg.test_split))

    def _tokenized(self, cfg, split: str) -> TokenData:
        data = text.load_token_split(cfg.dataset, split, self.tokenizer, self.seq_len, packing=cfg.packing,
                                     root=cfg.data_root, max_sequences=cfg.max_sequences)
        return TokenData(torch.from_numpy(data.tokens.astype(np.int64)), torch.from_numpy(data.labels()))

    def _from_cache(self, cfg):
        self.mode = "kd"
        with stores.open_store(cfg.cache) as store:
            stores.check_complete(store)
            attrs = store.get_attrs()
            if attrs.get("kind") != "tokens":
                raise KDCacheError(f"cache '{cfg.cache}' holds image targets; language-model students need a token "
                                   "cache (dump-teacher --dataset text:... or pydoc)")
            meta = attrs["tokens"]
            self.vocab, self.seq_len = int(attrs["teacher"]["num_classes"]), int(meta["seq_len"])
            self.tokenizer_info = meta["tokenizer"]
            self.eos_id = self.tokenizer_info.get("eos_id")
            self.train, self.test = (self._cached(store, cfg, s) for s in (cfg.train_split, cfg.test_split))
        folder = attrs["teacher"]["arch"].removeprefix("hf:")
        self.teacher_meta = models.read_meta(folder) if os.path.isdir(folder) else None

    def _cached(self, store, cfg, split: str) -> TokenData:
        if split not in store.group_names():
            raise KDCacheError(f"cache '{cfg.cache}' has no split '{split}'; it has {', '.join(store.group_names())}")
        reads = stores.CheckedReads(store, split, ["tokens", "labels"])
        tokens = torch.from_numpy(np.asarray(reads.read("tokens")).astype(np.int64))
        labels = torch.from_numpy(np.asarray(reads.read("labels")).astype(np.int64))
        codec_arrays = LogitCodec.from_attrs(store.get_attrs()).arrays()
        need = sum(int(np.prod(store.array(f"{split}/{k}").shape)) * np.dtype(dt).itemsize
                   for k, (_, dt) in codec_arrays.items() if store.has_array(f"{split}/{k}"))  # absent: the load refuses it
        place = choose_place(cfg.targets_in, need, self.device)
        if place == "stream":
            data = TokenData(tokens, labels, stream=StreamedSplit(cfg.cache, split), buffer_blocks=cfg.buffer_blocks)
        else:
            data = TokenData(tokens, labels, SplitTargets(store, split, device=self.device if place == "gpu" else "cpu"))
        if split == cfg.train_split:
            log.info(f"teacher targets: {need / 2**20:.2f} MiB, {place} ({cfg.targets_in})")
        if text.is_text_dataset(cfg.dataset):  # the user's text: it must be what the cache was computed on
            self._check_dataset(cfg, split, store.get_attrs(split)["dataset"])
        return data

    def _check_dataset(self, cfg, split: str, recorded: dict) -> None:
        spec = cfg.tokenizer or recorded["tokenizer"].get("source")
        tokenizer = text.load_tokenizer(spec, corpus=cfg.dataset, root=cfg.data_root)
        if tokenizer.sha256() != self.tokenizer_info["sha256"]:
            raise KDCacheError(f"tokenizer {spec} is not the one cache '{cfg.cache}' was dumped with; pass that "
                               "tokenizer with --tokenizer, or train from the cache's own tokens (drop --dataset)")
        data = text.load_token_split(cfg.dataset, split, tokenizer, recorded["seq_len"], packing=recorded["packing"],
                                     root=cfg.data_root, max_sequences=cfg.max_sequences)
        if data.fingerprint() != recorded["fingerprint"]:
            raise KDCacheError(f"cache '{cfg.cache}' split '{split}' holds the targets of other tokens than "
                               f"{cfg.dataset} gives ({recorded['length']} vs {len(data)} sequences; fingerprint "
                               "mismatch): the text or the sequence settings changed; dump the teacher again")


def train_lm_students(cfg: TrainConfig, device) -> list[dict]:
    """Every --student (and with --baseline, each without KD) on token sequences; the summary rows."""
    for name in cfg.students:
        models.check_lm_name(name)
    if cfg.loss not in losses.TOKEN_LOSSES:
        raise KDCacheError(f"--loss {cfg.loss} is an image loss; token caches train with {', '.join(losses.TOKEN_LOSSES)}")
    if cfg.jobs > 1:
        raise KDCacheError("--jobs is not offered for language-model students yet; train them one after another")
    setup = TokenSetup(cfg, device)
    runs = [(name, setup.mode) for name in cfg.students]
    if cfg.baseline and setup.mode != "plain":
        runs += [(name, "baseline") for name in cfg.students]
    rows = []
    for name, kind in runs:
        # as image sweeps name them: "hf:cfg/x.json" -> OUT/hf.cfg/x.json, a baseline beside its KD student
        folder = os.path.join(cfg.out, name.replace(":", ".") + ("-baseline" if kind == "baseline" else ""))
        meta = models.read_meta(folder)
        if meta is not None and not cfg.overwrite:
            if not cfg.resume:
                raise KDCacheError(f"'{folder}' already holds a trained student; pass --resume to keep it, "
                                   "--overwrite to retrain it, or choose another --out")
            row = meta["row"]
            log.info(lm_line(row) + "  (trained earlier)")
        else:
            row = fit_lm(name, kind, setup, folder)
        rows.append(row)
    write_summary(cfg.out, rows, setup)
    return rows


def fit_lm(name: str, kind: str, setup: TokenSetup, folder: str) -> dict:
    """Train one student for --epochs; write its folder; return its summary row."""
    cfg, device = setup.cfg, setup.device
    torch.manual_seed(cfg.seed)
    model = models.create_lm(name, vocab_size=setup.vocab, seq_len=setup.seq_len, eos_id=setup.eos_id).to(device)
    optimizer = make_optimizer(cfg, model)
    base_lr = [g["lr"] for g in optimizer.param_groups]
    alpha = Schedule(cfg.alpha_schedule, cfg.alpha_start, cfg.alpha)
    kd = kind == "kd"
    n = len(setup.train)
    steps_per_epoch = len(setup.train.order(cfg.batch_size, torch.Generator().manual_seed(cfg.seed), 1))
    total = cfg.epochs * steps_per_epoch
    order = torch.Generator().manual_seed(cfg.seed)
    os.makedirs(folder, exist_ok=True)
    history, step, started = [], 0, time.perf_counter()
    tokens_seen = 0
    with open(os.path.join(folder, "metrics.jsonl"), "w") as log_file:
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            sums = {"loss": 0.0, "task_loss": 0.0, "kd_loss": 0.0}
            with Progress(n, f"{name} epoch {epoch}/{cfg.epochs}", unit="sequences") as bar:
                for rows in setup.train.order(cfg.batch_size, order, epoch):
                    x, y, teacher = setup.train.batch(rows)
                    x, y = x.to(device), y.to(device)
                    mask = y != -100
                    for g, lr in zip(optimizer.param_groups, base_lr):
                        g["lr"] = lr * lr_factor(cfg.lr_schedule, step / total)
                    out = model(x).logits
                    parts = objective(out, y, mask, teacher if kd else None, alpha(step / total), cfg)
                    optimizer.zero_grad(set_to_none=True)
                    parts["loss"].backward()
                    optimizer.step()
                    loss = float(parts["loss"].detach())
                    if not math.isfinite(loss):  # named as train-student names it for image students
                        raise KDCacheError(f"training loss of {name} became {loss} in epoch {epoch}, step "
                                           f"{step - (epoch - 1) * steps_per_epoch + 1} of {steps_per_epoch}; lower --lr")
                    for k in sums:
                        sums[k] += float(parts[k].detach()) if k in parts else 0.0
                    step += 1
                    tokens_seen += int(mask.sum())
                    bar.update(len(rows), **{label: float(parts[key].detach()) for key, label in LOSS_PARTS
                                             if key in parts})
            m = {"epoch": epoch, **{k: v / steps_per_epoch for k, v in sums.items()},
                 **evaluate_lm(model, setup.test, device, cfg.batch_size)}
            m["seconds"] = round(time.perf_counter() - started, 2)
            history.append(m)
            log_file.write(json.dumps(m) + "\n")
            log_file.flush()
            log.info(f"{name} [{kind}] epoch {epoch}/{cfg.epochs}: loss {m['loss']:.3f}, perplexity "
                     f"{m['perplexity']:.2f}, top-1 {m['top1']:.2f}" +
                     (f", agreement {m['agreement']:.2f}" if m.get("agreement") is not None else ""))
    seconds = time.perf_counter() - started
    last = history[-1]
    row = {"student": name, "kind": kind, "params": models.count_parameters(model), "epochs": cfg.epochs,
           "perplexity": last["perplexity"], "top1": last["top1"], "agreement": last.get("agreement"),
           "tokens_per_s": round(tokens_seen / seconds, 1), "seconds": round(seconds, 2), "folder": folder}
    tokenizer = setup.tokenizer if setup.mode == "plain" else None
    meta = {"row": row, "history": history, "config": as_dict(cfg),
            "cache": cfg.cache, "tokens": {"seq_len": setup.seq_len, "vocab_size": setup.vocab}}
    models.save_lm(model, folder, tokenizer=tokenizer or _cache_tokenizer(setup), meta=meta)
    log.info(lm_line(row))
    return row


def _cache_tokenizer(setup: TokenSetup):
    """The tokenizer a student trained from a cache is saved with: the cache's (from its recorded source)."""
    source = setup.tokenizer_info.get("source")
    try:
        tokenizer = text.load_tokenizer(source)
    except KDCacheError:
        return None
    return tokenizer if tokenizer.sha256() == setup.tokenizer_info["sha256"] else None


def objective(out, y, mask, teacher, alpha: float, cfg: TrainConfig) -> dict:
    """(1 - alpha) * CE on the next tokens + alpha * token_kd, both over the positions with a target."""
    s = F.log_softmax(out[mask].float(), dim=-1)  # [M, V]: the positions with a target, normalised once for both terms
    task = F.nll_loss(s, y[mask]) if len(s) else out.sum() * 0.0
    if teacher is None:
        return {"loss": task, "task_loss": task}
    mask = mask.to(teacher.values.device if isinstance(teacher, TopK) else teacher.device)
    if isinstance(teacher, TopK):
        teacher = TopK(teacher.values[mask], teacher.indices[mask], teacher.logsumexp[mask], teacher.log_tail[mask],
                       teacher.num_classes).to(out.device)
    else:
        teacher = teacher[mask].to(out.device, torch.float32)
    try:
        kd = losses.token_kd(s, teacher, loss=cfg.loss, T=cfg.temperature, beta=cfg.jsd_beta, log_probs=True)
    except ValueError as e:
        raise KDCacheError(f"--loss {cfg.loss}: {e}") from None
    return {"loss": torch.lerp(task, kd, alpha), "task_loss": task, "kd_loss": kd}


@torch.no_grad()
def evaluate_lm(model, data: TokenData, device, batch_size: int) -> dict:
    """Perplexity (exp of the mean next-token CE), top-1 and agreement with the teacher's argmax, in %,
    over every position of `data` that carries a target."""
    model.eval()
    nll, hits, agree, count = 0.0, 0, 0, 0
    for rows in torch.arange(len(data)).split(batch_size):
        x, y, teacher = data.batch(rows)
        x, y = x.to(device), y.to(device)
        mask = y != -100
        out = model(x).logits[mask].float()
        target = y[mask]
        nll += float(F.cross_entropy(out, target, reduction="sum"))
        pred = out.argmax(-1)
        hits += int((pred == target).sum())
        if teacher is not None:
            agree += int((pred == teacher.argmax(dim=-1).to(device)[mask]).sum())
        count += int(mask.sum())
    count = max(count, 1)
    m = {"perplexity": math.exp(nll / count), "top1": 100.0 * hits / count}
    if data.targets is not None:
        m["agreement"] = 100.0 * agree / count
    return m


def lm_line(row: dict) -> str:
    agreement = f", agreement {row['agreement']:.2f}" if row.get("agreement") is not None else ""
    return (f"{row['student']} [{row['kind']}]: {row['params']:,} parameters, perplexity {row['perplexity']:.2f}, "
            f"top-1 {row['top1']:.2f}{agreement} ({row['seconds']:.0f} s)")


def write_summary(out: str, rows: list[dict], setup: TokenSetup) -> None:
    """OUT/summary.csv, a table on stdout and OUT/summary.png (perplexity and top-1 against parameters)."""
    teacher = (setup.teacher_meta or {}).get("row", {})
    for row in rows:
        row["teacher_perplexity"], row["teacher_top1"] = teacher.get("perplexity"), teacher.get("top1")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [f"{'student':<12} {'params':>9} {'kind':<9} {'ppl':>8} {'top1':>6} {'agree':>6}"]
    for r in rows:
        agree = "-" if r.get("agreement") is None else f"{r['agreement']:6.2f}"
        lines.append(f"{r['student']:<12} {r['params']:>9,} {r['kind']:<9} {r['perplexity']:8.2f} {r['top1']:6.2f} "
                     f"{agree:>6}")
    if teacher:
        lines.append(f"{'teacher':<12} {teacher['params']:>9,} {'':<9} {teacher['perplexity']:8.2f} "
                     f"{teacher['top1']:6.2f}")
    log.info("\n".join(lines))
    from kdcache.plots import plot_summary

    plot_summary(rows, os.path.join(out, "summary.png"),
                 panels=(("perplexity", "held-out perplexity", "teacher_perplexity"),
                         ("top1", "next-token top-1 (%)", "teacher_top1")))
