"""Section 11 of bench/run.py: token caches (kdcache/tokens/), a causal LM's next-token distributions.

A teacher (lm_medium, GPT-2 shape) is trained here on `pydoc` (bpe:2048, seq_len 64) for one epoch, then:
11a/11b dump / inference-only (target >= 0.95): `kdcache.dump_teacher` of a top-32 float16 token store of the
   first N train sequences against the teacher's forward over the same sequences in the same batches (the loader
   the dump builds, inference_mode, outputs discarded), rounds alternating. 11a the batch loop (a BlockWriter's
   life, as figure 1a), 11b the whole call (teacher, tokenizer, tokenizing, store, the loop, rename), as 1c.
11c train from cache / plain (target >= 0.97): the same optimizer steps of the same student (same init, batches,
   AdamW): `kdcache.tokens.train.objective` with top-32 targets gathered from the in-memory cache
   (TokenData.batch) against CE alone; STEPS steps per side and round, the median of the per-round ratios.
Bytes per token (a table, no target): the logit arrays (values, indices, logsumexp, log_tail) on disk per
   position, top-8/32/128 float16 and top-128 with packed indices and uint8 codes, at 2,048 tokens (real dumps)
   and at 152,064 (Qwen2's vocabulary: synthetic logits, written as a dump writes them); tokens + labels apart.
   Anchor: DistillKit stores about 300 B per token at k = 128 with a compressed tail.
11d perplexity (target: within 2%): the same student trained from a top-32 float16 store and from a dense float32
   store of the same teacher (same seeds, epochs, the KD settings of pipelines/pydoc-lm.yaml), held-out
   perplexity top-32 / dense - 1, mean over seeds; top-8 and no KD beside it.
On 2 CPU cores the section takes ~3.5 minutes (the sum of its parts, each timed here alone).
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import time

import numpy as np
import torch

from kdcache import dump_teacher, train_student
from kdcache import store as stores
from kdcache.config import TrainConfig
from kdcache.data import loader as data_loader
from kdcache.encodings import LogitCodec, index_dtype, to_storage
from kdcache.tokens import models, text
from kdcache.tokens.dump import LOGIT_BATCH_BYTES, Sequences
from kdcache.tokens.train import TokenData, TokenSetup, objective
from kdcache.train import make_optimizer
from encoding_costs import stored_per_sample
from synthetic import SplitWriter, root_attrs
from timing import Figure, alternate, best, paired, sync, timed_parts

DATASET, TOKENIZER, SEQ_LEN = "pydoc", "bpe:2048", 64  # the demo's (pipelines/pydoc-lm.yaml): 1,918 train sequences
TEACHER = "lm_medium"  # 2 x 128: ~45 us/position forward on 1 CPU thread; lm_large (~130 us) trains 3x slower here
STUDENT = "lm_small"  # 2 x 64: ~120 ms per CE step of 32 x 64 tokens, where KD's share of a step shows most
TEACHER_EPOCHS = 1  # 120 AdamW steps, ~20 s: held-out perplexity ~525, far from a trained model's
# lr and batch: one epoch of them reaches perplexity 525 in 18 s, the demo's (0.003, 32) 581 in 21 s
TEACHER_TRAINING = dict(optimizer="adamw", lr=0.01, weight_decay=0.01, batch_size=16)
DUMP_SEQUENCES, DUMP_BATCH = 256, 128  # 11a/11b: 2 batches per call (~1.2 s of forward per side)
STEPS = 8  # 11c: optimizer steps per side and round (~1.3 s)
BYTES_SEQUENCES = 128  # the other real dumps of the bytes table (~1.5 s each): bytes per token hardly depend on N
VOCAB_152K, VOCAB_POSITIONS = 152_064, 512  # synthetic 152k rows: ~0.2 s per 64 positions to draw, ~0.2 s per encoding
QUALITY_SEQUENCES = 384  # 11d: train sequences kept (and all 237 of test): 330 MB of float32, dumped in ~10 s
STUDENT_EPOCHS, SEEDS = 3, (0, 1)  # 11d: 36 steps, ~10 s a student
TOLERANCE = 0.02  # 11d: top-32's perplexity may exceed dense float32's by 2%
KD = dict(optimizer="adamw", lr=0.003, weight_decay=0.01, batch_size=32, alpha=0.5, alpha_start=0.1,
          alpha_schedule="cos", temperature=1.0)  # pipelines/pydoc-lm.yaml's students
BYTES_ENCODINGS = {  # name -> dump options; LogitCodec arguments at 152k
    "top-8": dict(topk=8), "top-32": dict(topk=32), "top-128": dict(topk=128),
    "top-128 packed": dict(topk=128, topk_indices="packed"),
    "top-128 u8 packed": dict(topk=128, dtype="uint8", topk_indices="packed"),
}
DISTILLKIT = 300  # B/token at k = 128, its compressed tail included: the anchor of the bytes table
QUICK = dict(teacher_sequences=32, dump_sequences=32, steps=2, bytes_sequences=16, vocab_positions=64,
             quality_sequences=32, student_epochs=1, seeds=(0,))  # --quick: checks that the section runs


def bench_tokens(work: str, device, rounds: int, *, teacher_sequences: int | None = None,
                 dump_sequences: int = DUMP_SEQUENCES, steps: int = STEPS, bytes_sequences: int = BYTES_SEQUENCES,
                 vocab_positions: int = VOCAB_POSITIONS, quality_sequences: int = QUALITY_SEQUENCES,
                 student_epochs: int = STUDENT_EPOCHS, seeds=SEEDS) -> tuple[list[Figure], list[str]]:
    folder = os.path.join(work, "tokens")
    os.makedirs(folder, exist_ok=True)
    log = os.path.join(folder, "log.txt")
    quiet = lambda: quietly(log)  # noqa: E731  train_student and dump_teacher log epochs and progress
    seconds = {}

    def part(name, run):
        start = time.perf_counter()
        result = run()
        seconds[name] = time.perf_counter() - start
        return result

    with quiet():
        row = part("teacher", lambda: train_student(
            students=[TEACHER], dataset=DATASET, tokenizer=TOKENIZER, seq_len=SEQ_LEN, epochs=TEACHER_EPOCHS,
            max_sequences=teacher_sequences, seed=0, device=str(device), out=os.path.join(folder, "teacher"),
            **TEACHER_TRAINING)[0])
    teacher = "hf:" + os.path.join(folder, "teacher", TEACHER)
    dump_figures, store = part("11a/b", lambda: bench_dump(folder, teacher, device, rounds, dump_sequences, quiet))
    train_figure = part("11c", lambda: bench_train(store, device, rounds, steps))
    bytes_lines = part("bytes", lambda: bytes_table(folder, teacher, store, device, bytes_sequences, vocab_positions,
                                                    quiet))
    quality_figure, quality_lines = part("11d", lambda: bench_perplexity(folder, teacher, device, quality_sequences,
                                                                         student_epochs, seeds, quiet))
    lines = [f"   {DATASET} ({TOKENIZER}, seq_len {SEQ_LEN}): teacher {TEACHER} ({row['params']:,} parameters, "
             f"{TEACHER_EPOCHS} epoch) held-out perplexity {row['perplexity']:.1f}; log {log} (kept with --keep)",
             "   parts: " + ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())]
    return dump_figures + [train_figure, quality_figure], lines + bytes_lines + quality_lines


def quietly(log: str):
    """stdout and stderr into the section's log (kdcache's logger writes to whatever sys.stdout is)."""
    stack = contextlib.ExitStack()
    out = stack.enter_context(open(log, "a"))
    stack.enter_context(contextlib.redirect_stdout(out))
    stack.enter_context(contextlib.redirect_stderr(out))
    return stack


def dump_options(teacher: str, sequences: int, device, **codec) -> dict:
    return dict(teacher=teacher, dataset=DATASET, seq_len=SEQ_LEN, max_sequences=sequences, device=str(device),
                overwrite=True, **codec)


# --- 11a/11b: dump vs the teacher's forward -------------------------------------------------------

def teacher_forward(model, data: text.TokenSplit, batch: int, device) -> None:
    """The teacher over the loader the dump builds (kdcache/tokens/dump.py), outputs discarded."""
    loader = data_loader(Sequences(data), batch_size=batch, shuffle=False, num_workers=0,
                         pin_memory=device.type == "cuda")
    with torch.inference_mode():
        for tokens, _ in loader:
            model(tokens.to(device, non_blocking=True)).logits.float()  # as the dump: float32 logits
    sync(device)


def bench_dump(folder: str, teacher: str, device, rounds: int, sequences: int, quiet) -> tuple[list[Figure], str]:
    out = os.path.join(folder, "top32.zarr")
    options = dump_options(teacher, sequences, device, topk=32, dtype="float16", splits=["train"], out=out,
                           batch_size=DUMP_BATCH)
    model, info = models.load_lm(teacher)
    model = model.to(device).eval()
    tokenizer = text.load_tokenizer(teacher.removeprefix("hf:"))
    data = text.load_token_split(DATASET, "train", tokenizer, SEQ_LEN, max_sequences=sequences)
    batch = max(1, min(DUMP_BATCH, LOGIT_BATCH_BYTES // (4 * SEQ_LEN * info["vocab_size"])))  # as TokenDump caps it
    parts = {"loop": [], "data": []}

    def dump_call():
        with quiet(), timed_parts({}, text, "load_token_split") as record:
            start = time.perf_counter()
            dump_teacher(**options)
            total = time.perf_counter() - start
        for key in parts:
            parts[key].append(record[key])
        return total

    teacher_forward(model, data, batch, device)  # warm-up: the first forward allocates its buffers
    times = alternate({"infer": lambda: teacher_forward(model, data, batch, device), "dump": dump_call}, rounds)
    times["loop"], times["data"] = parts["loop"], parts["data"]
    positions = len(data) * SEQ_LEN
    rate = lambda side: f"{positions / min(times[side]):,.0f}"  # noqa: E731
    loop = lambda **t: t["infer"] / t["loop"]  # noqa: E731
    call = lambda **t: t["infer"] / t["dump"]  # noqa: E731
    fixed = paired(times, lambda **t: t["dump"] - t["loop"])
    tokenizing = paired(times, lambda **t: t["data"])
    return [
        Figure("11a", "token dump/forward, top-32, batch loop", paired(times, loop), best(times, loop), 0.95,
               ">= 0.95", note=f"forward {rate('infer')} tokens/s, dump loop {rate('loop')} tokens/s (best rounds); "
                               f"{TEACHER}, {len(data)} x {SEQ_LEN} tokens in batches of {batch}, vocabulary "
                               f"{info['vocab_size']:,}"),
        Figure("11b", "token dump/forward, whole dump_teacher() call", paired(times, call), best(times, call), 0.95,
               ">= 0.95", note=f"dump call {rate('dump')} tokens/s (best); fixed costs per call (call - loop) "
                               f"{1000 * fixed:.0f} ms, of which tokenizing {1000 * tokenizing:.0f} ms (medians)"),
    ], out


# --- 11c: training from the cache vs plain LM training ---------------------------------------------

def train_steps(data: TokenData, batches: list, cfg: TrainConfig, setup: TokenSetup, device) -> float:
    """fit_lm's step over `batches` from the same init; with data.targets the teacher comes from the cache."""
    torch.manual_seed(cfg.seed)
    model = models.create_lm(STUDENT, vocab_size=setup.vocab, seq_len=setup.seq_len, eos_id=setup.eos_id).to(device)
    optimizer = make_optimizer(cfg, model)
    model.train()
    sync(device)
    start = time.perf_counter()
    for rows in batches:
        x, y, teacher = data.batch(rows)
        x, y = x.to(device), y.to(device)
        mask = y != -100
        parts = objective(model(x).logits, y, mask, teacher, cfg.alpha, cfg)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        optimizer.step()
        for value in parts.values():  # fit_lm reads every part each step (a device sync)
            float(value.detach())
    return time.perf_counter() - start


def bench_train(store: str, device, rounds: int, steps: int) -> Figure:
    cfg = TrainConfig(students=[STUDENT], cache=store, test_split="train", **KD)  # the store of 11a has train only
    setup = TokenSetup(cfg, device)
    cached = setup.train
    plain = TokenData(cached.tokens, cached.labels)  # the same sequences, no targets
    order = torch.randperm(len(cached), generator=torch.Generator().manual_seed(0)).split(cfg.batch_size)
    batches = [order[i % len(order)] for i in range(steps)]
    train_steps(cached, batches[:2], cfg, setup, device)  # warm-up: the first backward allocates its buffers
    times = alternate({"plain": lambda: train_steps(plain, batches, cfg, setup, device),
                       "cached": lambda: train_steps(cached, batches, cfg, setup, device)}, rounds)
    ratio = lambda plain, cached: plain / cached  # noqa: E731
    tokens = sum(len(b) for b in batches) * setup.seq_len
    extra = paired(times, lambda plain, cached: (cached - plain) / steps)
    note = (f"plain {tokens / min(times['plain']):,.0f} tokens/s, from cache {tokens / min(times['cached']):,.0f} "
            f"tokens/s (best rounds); KD from the cache adds {1000 * extra:.1f} ms/step (median); {STUDENT}, "
            f"batch {cfg.batch_size} x {setup.seq_len}, {steps} steps/side, top-32 soft_target at T {cfg.temperature:g}")
    return Figure("11c", f"token train from cache / plain LM, {STUDENT}", paired(times, ratio),
                  best(times, ratio), 0.97, ">= 0.97", note=note)


# --- bytes per token --------------------------------------------------------------------------------

def logits_bytes(path: str) -> tuple[float, float, int]:
    """(bytes on disk per position of the logit arrays, of tokens + labels, positions) of a store's train split."""
    with stores.open_store(path) as store:
        shape = store.array("train/labels").shape
        positions = math.prod(shape)
        sizes = {a: store.stored_bytes(f"train/{a}") for a in store.array_names("train")}
    side = sum(sizes.get(a, 0) for a in ("tokens", "labels"))
    return (sum(sizes.values()) - side) / positions, side / positions, positions


def lm_logits(n: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """[n, V] float32 next-token logits of a made-up LM: a Zipf(1.1) prior over ids (low ids frequent, as a BPE
    vocabulary orders its merges), per-position noise (std 1.5), and 16 tokens the context makes likely."""
    prior = -1.1 * torch.log1p(torch.arange(vocab, dtype=torch.float32))
    x = prior + 1.5 * torch.randn(n, vocab, generator=generator)
    picked = torch.randint(0, vocab, (n, 16), generator=generator)
    return x.scatter_(1, picked, 2.0 + 1.5 * torch.randn(n, 16, generator=generator))


def write_vocab_stores(paths: dict, positions: int, vocab: int) -> None:
    """Token stores `{path: codec}` of `positions` synthetic rows (sequences of SEQ_LEN) from one pass: each
    sequence's logits are drawn once and encoded for every store, then written as a dump writes them."""
    sequences = max(1, positions // SEQ_LEN)
    opened = {path: stores.create_store(path) for path in paths}
    try:
        writers = {}
        for path, codec in paths.items():
            opened[path].update_attrs(root_attrs(codec))
            specs = {name: ((SEQ_LEN, *tail), dtype) for name, (tail, dtype) in codec.arrays().items()}
            writers[path] = SplitWriter(opened[path], specs, np.zeros(sequences, dtype=np.int64))
        g = torch.Generator().manual_seed(0)
        for _ in range(sequences):
            logits = lm_logits(SEQ_LEN, vocab, g)  # [L, V] float32: 39 MB at 152k
            for path, codec in paths.items():
                dtypes = codec.arrays()
                encoded = codec.encode(logits)  # {name: [L, ...]} -> one sequence [1, L, ...]
                writers[path].put({k: to_storage(t.unsqueeze(0), dtypes[k][1]) for k, t in encoded.items()})
        for path in paths:
            writers[path].close()
            opened[path].update_attrs({"complete": True})
    finally:
        for store in opened.values():
            store.close()


def codec_of(options: dict, vocab: int) -> LogitCodec:
    return LogitCodec(options.get("dtype", "float16"), options["topk"], vocab, indices=options.get("topk_indices", "plain"))


def bytes_table(folder: str, teacher: str, top32: str, device, sequences: int, positions: int, quiet) -> list[str]:
    real = {"top-32": top32}  # the store of 11a/11b
    with quiet():
        for name, options in BYTES_ENCODINGS.items():
            if name not in real:
                options = {"dtype": "float16", **options}
                out = os.path.join(folder, f"bytes-{name.replace(' ', '-')}.zarr")
                real[name] = dump_teacher(**dump_options(teacher, sequences, device, splits=["train"], out=out, **options))
    measured = {name: logits_bytes(path) for name, path in real.items()}
    codecs = {name: codec_of(o, VOCAB_152K) for name, o in BYTES_ENCODINGS.items()}
    paths = {os.path.join(folder, f"v152k-{name.replace(' ', '-')}.zarr"): codec for name, codec in codecs.items()}
    start = time.perf_counter()
    write_vocab_stores(paths, positions, VOCAB_152K)
    seconds = time.perf_counter() - start
    synthetic = {name: stored_per_sample(path, max(1, positions // SEQ_LEN) * SEQ_LEN)
                 for name, path in zip(codecs, paths)}
    for path in paths:
        stores.remove_store(path)
    vocab = 2048
    small = {name: codec_of(o, vocab) for name, o in BYTES_ENCODINGS.items()}
    side = measured["top-32"][1]
    lines = ["", "   bytes per token position of the logit arrays (values, indices, logsumexp, log_tail), zarr (zstd 1):",
             f"   2,048 tokens: real dumps of {TEACHER} ({measured['top-128'][2]:,} positions; top-32: "
             f"{measured['top-32'][2]:,}); 152,064: synthetic logits (Zipf prior + noise, bench/tokens.py), "
             f"{positions:,} positions written in {seconds:.0f} s",
             f"   {'encoding':<19}{'2k raw B':>9}{'2k disk B':>11}{'152k raw B':>12}{'152k disk B':>13}"]
    for name in BYTES_ENCODINGS:
        lines.append(f"   {name:<19}{small[name].bytes_per_view():>9,}{measured[name][0]:>11,.1f}"
                     f"{codecs[name].bytes_per_view():>12,}{synthetic[name]:>13,.1f}")
    raw_side = np.dtype(index_dtype(vocab)).itemsize + 4
    lines.append(f"   tokens + labels: {side:.2f} B/token on disk at 2,048 ({raw_side} B raw: {index_dtype(vocab)} ids, "
                 f"int32 labels); at 152,064 {np.dtype(index_dtype(VOCAB_152K)).itemsize + 4} B raw "
                 f"({index_dtype(VOCAB_152K)} ids)")
    lines.append(f"   anchor: DistillKit stores about {DISTILLKIT} B per token at k = 128 with a compressed tail; "
                 f"kdcache top-128 at 152k: {synthetic['top-128']:,.0f} B (float16, uint32 indices), "
                 f"{synthetic['top-128 packed']:,.0f} B (18-bit indices), {synthetic['top-128 u8 packed']:,.0f} B "
                 f"(uint8 codes, 18-bit indices), each with its exact tail mass")
    return lines


# --- 11d: perplexity from top-k against dense float32 targets ----------------------------------------

def top_mass(path: str, split: str) -> float:
    """Mean probability the stored top-k hold (1 - exp(log_tail)) over the positions with a target."""
    with stores.open_store(path) as store:
        tail = np.asarray(store.array(f"{split}/log_tail")[...])
        labels = np.asarray(store.array(f"{split}/labels")[...])
    return float(np.mean(1.0 - np.exp(tail[labels != -100])))


QUALITY_STORES = {"float32": dict(dtype="float32"), "top-32": dict(topk=32, dtype="float16"),
                  "top-8": dict(topk=8, dtype="float16")}


def bench_perplexity(folder: str, teacher: str, device, sequences: int, epochs: int, seeds,
                     quiet) -> tuple[Figure, list[str]]:
    caches = {}
    with quiet():
        for name, options in QUALITY_STORES.items():
            caches[name] = dump_teacher(**dump_options(teacher, sequences, device, splits=["train", "test"],
                                                       out=os.path.join(folder, f"quality-{name}.zarr"), **options))
    mass = top_mass(caches["top-32"], "test")
    ppl: dict = {name: {} for name in (*QUALITY_STORES, "no KD")}
    started = time.perf_counter()
    for seed in seeds:
        for name, path in caches.items():
            with quiet():
                rows = train_student(students=[STUDENT], cache=path, epochs=epochs, seed=seed, device=str(device),
                                     baseline=name == "top-32",  # no KD: the same student beside it, once per seed
                                     out=os.path.join(folder, "students", name, str(seed)), **KD)
            ppl[name][seed] = rows[0]["perplexity"]
            if name == "top-32":
                ppl["no KD"][seed] = rows[1]["perplexity"]
    seconds = time.perf_counter() - started
    for path in caches.values():
        stores.remove_store(path)  # 0.3 GB of float32
    rel = {name: [ppl[name][s] / ppl["float32"][s] - 1 for s in seeds] for name in ppl}
    per_seed = lambda values, fmt: " / ".join(f"{v:{fmt}}" for v in values)  # noqa: E731
    lines = ["", f"   held-out perplexity of {STUDENT} ({epochs} epoch{'s' * (epochs != 1)}, {sequences} train "
                 f"sequences, KD as pipelines/pydoc-lm.yaml: soft_target T 1, alpha 0.1 -> 0.5 cos) per target store, seeds "
                 f"{', '.join(map(str, seeds))}, {seconds:.0f} s of training; 'vs float32': paired, per seed",
             f"   teacher: its top-32 holds {mass:.0%} of its probability at a held-out position (mean)",
             f"   {'targets':<10}{'perplexity per seed':<24}{'mean':>8}{'vs float32 per seed':>24}{'mean':>9}"]
    for name in ppl:
        values = [ppl[name][s] for s in seeds]
        lines.append(f"   {name:<10}{per_seed(values, '.2f'):<24}{statistics.mean(values):>8.2f}"
                     f"{per_seed(rel[name], '+.2%') if name != 'float32' else '':>24}"
                     f"{f'{statistics.mean(rel[name]):+.2%}' if name != 'float32' else '':>9}")
    d = statistics.mean(rel["top-32"])
    figure = Figure("11d", f"token KD perplexity, top-32 / float32 - 1, {STUDENT}", 100 * d, None, 100 * TOLERANCE,
                    f"<= +{100 * TOLERANCE:.0f}% (target used)", unit=" %", at_most=True, judge="median", fmt="+.2f",
                    note=f"mean over seeds of {per_seed(rel['top-32'], '+.2%')}; top-8 "
                         f"{statistics.mean(rel['top-8']):+.2%}, no KD {statistics.mean(rel['no KD']):+.2%}; float32 perplexity "
                         f"{statistics.mean(ppl['float32'].values()):.2f}")
    return figure, lines
