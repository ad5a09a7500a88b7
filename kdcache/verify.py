"""`kdcache verify`: is a store whole and sound? A list of problems, empty when it is.

Checks completeness, every block (the unit of writing) against the checksum recorded when it was written (a flipped
byte, a truncated or a deleted chunk file all show), non-finite values, the fingerprint, and that
a sample of a view cache's views still replays to the inputs the teacher saw; of a token store,
that its tokens and labels are the sequences the fingerprint records and the text still gives.
`CheckedReads` makes the block checks as training and inspect read a split, on what they read and nothing more.
"""
from __future__ import annotations


import numpy as np

from kdcache import store as stores
from kdcache.encodings import ActivationCodec, LogitCodec, stored_dtypes
from kdcache.errors import KDCacheError
from kdcache.progress import log
from kdcache.store.records import chunk_checksum


def verify_store(path: str, *, dataset: str | None = None, augment: str | None = None,
                 data_root: str | None = None, tokenizer: str | None = None) -> list[str]:
    """The problems of the store at `path`, [] when it is sound.

    The checks that load the data (fingerprint, replay) use the dataset, view transform, data
    root and (token stores) tokenizer the user names, else those the store records. A store may
    name registry entries only: a `module:callable` it names is never imported (stores are shared),
    and the check that needs it is skipped with a note saying how to run it (name it: --dataset /
    --augment). A token store names text and a tokenizer file, which are read, never run.
    """
    problems = []
    with stores.open_store(path) as store:
        attrs = store.get_attrs()
        tokens = attrs.get("kind") == "tokens"
        if tokenizer is not None and not tokens:
            raise KDCacheError(f"--tokenizer applies to token stores, and {path} holds image targets; drop --tokenizer")
        held = (attrs.get("augment") or {}).get("preset")
        if augment is not None and held is not None and augment != held:
            raise KDCacheError(f"--augment {augment}: store {path} replays the views it was dumped with "
                               f"(--augment {held}); drop --augment, or pass that one")
        named = {"dataset": dataset, "augment": augment, "data_root": data_root, "tokenizer": tokenizer}
        loaded = None  # a token store's tokenizer, to tokenize its text again
        if tokens:
            loaded, problems = _token_tokenizer(path, attrs, named)
        if not attrs.get("complete"):
            problems.append("store is not marked complete (interrupted dump?)")
        for split in attrs.get("splits", []):
            if split not in store.group_names():
                problems.append(f"split '{split}' is missing")
                continue
            problems += _verify_split(store, split, attrs, named, loaded)
    return problems


REPLAY_SAMPLE = 64  # views regenerated per augmented split, as train-student's --verify-replay default


def _verify_split(store, split: str, attrs: dict, named: dict, tokenizer=None) -> list[str]:
    problems = []
    split_attrs = store.get_attrs(split)
    dataset = split_attrs.get("dataset") or {}
    n = dataset.get("length")
    if split_attrs.get("rows_written") != n:
        problems.append(f"split '{split}': {split_attrs.get('rows_written')} of {n} rows written")
    checksums = split_attrs.get("checksums", {})
    block = split_attrs.get("block_rows")
    if block is None:
        return problems + [f"split '{split}': no block size recorded (interrupted before its arrays were made?)"]
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        return problems + [f"split '{split}': block_rows {block!r} is not a whole number of rows above 0 (hand-edited?)"]
    if not isinstance(checksums, dict):
        problems.append(f"split '{split}': its checksums are recorded as {type(checksums).__name__}, "
                        "not {array: [crc32 per block]}")
        checksums = {}
    problems += _verify_arrays(store, split, attrs)
    for name in store.array_names(split):
        array = store.array(f"{split}/{name}")
        if array.shape[0] != n:
            problems.append(f"{split}/{name}: {array.shape[0]} rows, expected {n}")
        problems += _verify_blocks(array, block, f"{split}/{name}", checksums.get(name), _float_bits(name, attrs),
                                   minus_inf_ok=name in RULED_OUT_OK)
    if attrs.get("kind") == "tokens":
        return problems + _verify_tokens(store, split, dataset, attrs, named, tokenizer)
    problems += _verify_data(store, split, dataset, attrs, split_attrs, named)
    return problems


# -inf is a class the teacher ruled out (probability 0, kept with --allow-nonfinite), and a tail of
# nothing: every top-K = C row, or a tail of ruled-out classes. NaN and +inf are never valid targets.
RULED_OUT_OK = ("logits", "log_tail")


def _float_bits(name: str, attrs: dict) -> str | None:
    """"bfloat16" for an array stored as bfloat16's bits in uint16, whose values verify must decode to check."""
    if name == "logits" and attrs.get("dtype") == "bfloat16":
        return "bfloat16"
    if name.startswith("activations/") and attrs.get("activation_dtype", attrs.get("dtype")) == "bfloat16":
        return "bfloat16"
    return None


def _verify_arrays(store, split: str, attrs: dict) -> list[str]:
    """The arrays the root attrs say every split holds are there, of the storage dtype they say (a
    dtype edited in an array's metadata leaves its bytes and checksums as they were)."""
    try:
        codec = LogitCodec.from_attrs(attrs)
    except KDCacheError:  # attrs that training refuses in a line of their own; the blocks are still checked
        return []
    expected = {**stored_dtypes(codec, ActivationCodec.from_attrs(attrs), attrs.get("activations", {})), "labels": None}
    problems = []
    for name, dtype in expected.items():
        if not store.has_array(f"{split}/{name}"):
            problems.append(f"{split}/{name}: missing")
        elif dtype is not None and np.dtype(store.array(f"{split}/{name}").dtype) != np.dtype(dtype):
            problems.append(f"{split}/{name}: stored as {store.array(f'{split}/{name}').dtype}, but the store's "
                            f"encoding says {dtype} (its metadata was edited)")
    return problems


def _verify_blocks(array, rows: int, label: str, recorded: list | None, float_bits: str | None = None, *,
                   minus_inf_ok: bool = False) -> list[str]:
    """Each block of `rows` rows against the checksum its writer recorded, and its floats for NaN and inf
    (-inf allowed where `minus_inf_ok`; `float_bits`: the float type of integer-stored bits)."""
    if recorded is None:
        return [f"{label}: no block checksums recorded"]
    if not isinstance(recorded, list):
        return [f"{label}: its checksums are recorded as {type(recorded).__name__}, not a list of crc32 per block"]
    problems = []
    for i, start in enumerate(range(0, array.shape[0], rows)):
        try:
            values = np.asarray(array[start : start + rows])
        except Exception as e:  # the backend's own checksum or decompression failed
            problems.append(f"{label}: block {i} (rows {start}-{start + rows - 1}) is unreadable: {e}")
            continue
        expected = recorded[i] if i < len(recorded) else None
        if expected is None:
            problems.append(f"{label}: block {i} was never written")
        elif chunk_checksum(values) != expected:
            problems.append(f"{label}: block {i} (rows {start}-{start + rows - 1}) does not match its checksum "
                            "(changed, or missing and read as the fill value)")
        else:
            floats = _as_float(values, float_bits)
            if floats is None:
                continue
            bad = np.isnan(floats) | (floats == np.inf) if minus_inf_ok else ~np.isfinite(floats)
            if bad.any():
                row = start + int(np.argwhere(bad.reshape(len(bad), -1).any(1))[0][0])
                what = "NaN or +inf" if minus_inf_ok else "non-finite"
                problems.append(f"{label}: {what} values, first at row {row}")
    return problems


def _as_float(values: np.ndarray, float_bits: str | None) -> np.ndarray | None:
    """Stored values as floats to check, or None when they are not floats (indices, codes, labels)."""
    if float_bits == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)  # bfloat16 is float32's upper half
    return values if values.dtype.kind == "f" else None


def _verify_data(store, split: str, dataset: dict, attrs: dict, split_attrs: dict, named: dict) -> list[str]:
    """Where the data can be loaded here: recompute its fingerprint, and replay a sample of the
    split's views (if it has them) against their digests. Skipped, with a note, where it cannot
    (the data are elsewhere) or may not (the store names code the user did not)."""
    from kdcache import augment
    from kdcache.data import load_split

    if not dataset.get("fingerprint"):
        return [f"split '{split}': no dataset fingerprint recorded"]
    name = named["dataset"] or dataset.get("name")
    if not isinstance(name, str):
        return [f"split '{split}': no dataset name recorded"]
    root = named["data_root"] or (attrs.get("config") or {}).get("data_root")
    try:
        data = load_split(name, split, root=root, stored_in=None if named["dataset"] else store.path)
    except KDCacheError as e:
        return _skipped(split, "fingerprint and replay checks", e)
    if data.fingerprint() != dataset["fingerprint"]:
        return [f"split '{split}': dataset {name} no longer matches the recorded fingerprint"]
    recorded = attrs.get("augment") or {}
    if split not in recorded.get("splits", []) or not store.has_array(f"{split}/view_digests"):
        return []
    try:
        recipe = augment.stored_recipe(store, data, recorded, named=named["augment"])
    except KDCacheError as e:
        return _skipped(split, "replay check", e)
    try:
        augment.check_replay(recipe, recipe.stored["view_digests"], REPLAY_SAMPLE, recorded, split_attrs, split)
    except KDCacheError as e:
        return [str(e)]
    return []


# --- token stores ------------------------------------------------------------------------------


def _token_tokenizer(path: str, attrs: dict, named: dict) -> tuple:
    """(the tokenizer to tokenize the text again with, or None, problems): --tokenizer, else the one
    the store records, loaded once for every split and held to the recorded sha256. Where it cannot be
    loaded here (moved), the text checks are skipped with a note, as image checks are without their data."""
    from kdcache.tokens import text

    if named["dataset"] is not None and not text.is_text_dataset(named["dataset"]):
        raise KDCacheError(f"--dataset {named['dataset']}: {path} is a token store, checked against text; "
                           f"name a text dataset ({text.SPEC_FORMS})")
    recorded = (attrs.get("tokens") or {}).get("tokenizer") or {}
    config = attrs.get("config") or {}
    spec = named["tokenizer"]
    if spec is None:  # a bpe:N trained at dump time records a description as its source: train it again
        trained = config.get("tokenizer")
        spec = trained if isinstance(trained, str) and trained.startswith("bpe:") else recorded.get("source")
    if not isinstance(spec, str):
        log.info("note: dataset checks skipped: the store records no tokenizer source; pass --tokenizer")
        return None, []
    corpus = named["dataset"] or config.get("dataset")
    try:
        tokenizer = text.load_tokenizer(spec, corpus=corpus, root=named["data_root"] or config.get("data_root"))
    except KDCacheError as e:
        log.info(f"note: dataset checks skipped: {e} (verify --tokenizer / --dataset name them)")
        return None, []
    if tokenizer.sha256() != recorded.get("sha256"):
        fix = ("pass the one it was dumped with" if named["tokenizer"] else
               "it changed since the dump; pass the original with --tokenizer")
        return None, [f"tokenizer {spec} (sha256 {tokenizer.sha256()[:12]}) is not the one {path} was dumped with "
                      f"(sha256 {str(recorded.get('sha256'))[:12]}): {fix}"]
    return tokenizer, []


def _verify_tokens(store, split: str, dataset: dict, attrs: dict, named: dict, tokenizer) -> list[str]:
    """A token split: its stored tokens and labels against each other and the recorded fingerprint;
    then, where the text can be read here, the text tokenized again with `tokenizer` (None: not to be
    had, said once) and the recorded sequence length, packing and max_sequences against that fingerprint."""
    from kdcache.tokens import text

    if not dataset.get("fingerprint"):
        return [f"split '{split}': no dataset fingerprint recorded"]
    if not store.has_array(f"{split}/tokens"):
        return [f"split '{split}': no tokens array (the ids the teacher ran on)"]
    problems = _stored_tokens(store, split, dataset)
    name = named["dataset"] or dataset.get("name")
    if not isinstance(name, str) or not text.is_text_dataset(name):
        return problems + _skipped(split, "dataset check", f"the store records no text dataset ({name!r}); pass --dataset")
    if tokenizer is None:  # skipped (said once), or not the store's: a problem already
        return problems
    config = attrs.get("config") or {}
    try:
        data = text.load_token_split(name, split, tokenizer, dataset.get("seq_len"),
                                     packing=dataset.get("packing"), root=named["data_root"] or config.get("data_root"),
                                     max_sequences=config.get("max_sequences"))
    except KDCacheError as e:
        return problems + _skipped(split, "dataset check", e)
    if data.fingerprint() != dataset["fingerprint"]:
        problems.append(f"split '{split}': dataset {name} no longer gives the recorded sequences ({len(data)} vs "
                        f"{dataset.get('length')} recorded, fingerprint mismatch): the text or its tokenizer changed "
                        "since the dump; dump the teacher again")
    return problems


def _stored_tokens(store, split: str, dataset: dict) -> list[str]:
    """The stored tokens [N, L] and labels [N, L] against each other (a label is the next stored token)
    and against the recorded fingerprint (which they rebuild: the mask is where labels are not -100)."""
    from kdcache.tokens import text

    try:
        tokens = np.asarray(store.read(f"{split}/tokens"), dtype=np.int64)
        labels = np.asarray(store.read(f"{split}/labels"), dtype=np.int64)
    except Exception:  # a block the backend cannot read: the block checks have named it
        return []
    if labels.shape != tokens.shape:
        return [f"{split}/labels: shape {labels.shape}, expected the tokens' {tokens.shape}"]
    problems = []
    mask = labels != -100
    wrong = mask[:, :-1] & (labels[:, :-1] != tokens[:, 1:])
    if wrong.any():
        i, t = (int(v) for v in np.argwhere(wrong)[0])
        problems.append(f"{split}/labels: {int(wrong.sum())} labels are not the next stored token, first at sequence "
                        f"{i} position {t} ({labels[i, t]}, next token {tokens[i, t + 1]})")
    stored = text.TokenSplit(name=str(dataset.get("name")), split=split, tokens=tokens, mask=mask,
                             seq_len=dataset.get("seq_len"), packing=dataset.get("packing"), tokenizer={})
    if stored.fingerprint() != dataset["fingerprint"]:
        problems.append(f"split '{split}': the stored tokens and labels are not the sequences the recorded "
                        "fingerprint describes (changed since the dump)")
    return problems


def _skipped(split: str, checks: str, why) -> list[str]:
    """A check that needs data or code not to be had here: said on stdout, not counted as a problem."""
    log.info(f"note: split '{split}': {checks} skipped: {why}")
    return []
