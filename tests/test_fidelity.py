"""`kdcache fidelity` measures what candidate encodings cost on disk and how far their targets lie from
the full ones; `kdcache convert --budget` picks the most faithful that fits and records why."""
import json
import math

import pytest
import torch

from kdcache import fidelity
from kdcache import store as stores
from kdcache.convert import convert_store
from kdcache.encodings import LogitCodec
from kdcache.errors import KDCacheError
from kdcache.losses import topk_teacher_bins
from kdcache.report import describe_store, format_report
from kdcache.verify import verify_store
from helpers.synthetic_store import structured_logits, write_store
from helpers.cli import one_line, run

C, N = 1000, 512
BLOCK_BYTES = 64 * C * 4  # 64-row blocks of float32 logits: the split is 8 blocks
SOME = ["float16", "int8", "top32-float16", "top8-float16", "top32-uint8-packed", "sample12-float16-packed"]


@pytest.fixture(scope="module")
def full_store(tmp_path_factory) -> str:
    """512 samples of a 1,000-class teacher with class structure, float32 logits, as a dump writes them."""
    logits, labels = structured_logits(N, C)
    return write_store(str(tmp_path_factory.mktemp("f") / "full.zarr"), logits, labels, LogitCodec("float32", None, C),
                       chunk_bytes=BLOCK_BYTES)


@pytest.fixture(scope="module")
def report(full_store) -> dict:
    return fidelity.measure(full_store, candidates=SOME, rows=256)


def by_name(report: dict) -> dict:
    return {e["name"]: e for e in report["candidates"]}


def logit_bytes(path: str) -> float:
    """Bytes on disk per sample of the train split's arrays, labels left out (what inspect shows)."""
    s = describe_store(path)["splits"]["train"]
    return sum(a["stored_bytes"] for k, a in s["arrays"].items() if k != "labels") / N


# ----------------------------------------------------------------------------- the report


def test_the_sample_is_whole_blocks_spread_over_the_split(report):
    assert report["samples"] == 256 and report["of"] == N and report["blocks"] == [0, 2, 5, 7]


def test_bytes_are_measured_on_disk_and_match_a_real_convert_of_the_store(report, full_store, tmp_path):
    got = by_name(report)
    for name, options in [("float16", dict(dtype="float16")), ("top32-uint8-packed",
                          dict(topk=32, dtype="uint8", indices="packed")), ("top8-float16", dict(topk=8, dtype="float16"))]:
        real = logit_bytes(convert_store(full_store, tmp_path / f"{name}.zarr", **options))
        assert got[name]["bytes_per_sample"] == pytest.approx(real, rel=0.1), name  # 256 of 512 samples
        assert got[name]["bytes_per_sample"] < got[name]["raw_bytes_per_sample"]  # zstd took something off
    assert got["top32-uint8-packed"]["raw_bytes_per_sample"] == 84 and got["top32-float16"]["raw_bytes_per_sample"] == 136


def test_an_exact_encoding_has_zero_divergence_and_the_teachers_own_calibration(full_store):
    r = fidelity.measure(full_store, candidates=["float32"], rows=64)
    e = r["candidates"][0]
    assert e["kl"] == 0 and e["tv"] == 0 and e["top1_agreement"] == 100
    assert e["ece"] == pytest.approx(r["full_ece"], rel=1e-9)


def test_keeping_more_of_the_teacher_is_more_faithful(report):
    got = by_name(report)
    assert 0 <= got["float16"]["kl"] < got["int8"]["kl"] < got["top32-float16"]["kl"] < got["top8-float16"]["kl"]
    assert got["top32-uint8-packed"]["kl"] == pytest.approx(got["top32-float16"]["kl"], rel=0.01)
    assert got["top32-float16"]["top1_agreement"] == 100
    # one row's draws are a sparse distribution: KL is infinite, total variation is not
    assert math.isinf(got["sample12-float16-packed"]["kl"]) and 0 < got["sample12-float16-packed"]["tv"] < 1


def test_the_rebuilt_topk_target_is_the_training_bins_with_the_tail_spread_evenly():
    logits, _ = structured_logits(5, 50)
    codec = LogitCodec("float16", 8, 50)
    top = codec.decode(codec.encode(logits))
    rebuilt = fidelity.rebuilt_log_probs(top, 4.0)
    bins = topk_teacher_bins(top, 4.0)
    torch.testing.assert_close(rebuilt.gather(1, top.indices), bins[:, :8])
    tail = rebuilt.scatter(1, top.indices, -math.inf)
    torch.testing.assert_close(torch.logsumexp(tail, 1), bins[:, 8], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rebuilt.exp().sum(1), torch.ones(5))


def test_expected_calibration_error_is_confidence_minus_accuracy_per_bin(tmp_path):
    # every row 90% sure (of 10 classes); half of them right: one bin, |0.9 - 0.5| = 0.4
    logits = torch.zeros(64, 10)
    logits[:, 3] = math.log(81.0)  # p_3 = 81 / (81 + 9) = 0.9
    labels = torch.tensor([3, 4] * 32)
    path = write_store(str(tmp_path / "c.zarr"), logits, labels, LogitCodec("float32", None, 10))
    r = fidelity.measure(path, candidates=["float16"], rows=64)
    assert r["full_ece"] == pytest.approx(0.4, rel=1e-5) and r["candidates"][0]["ece"] == pytest.approx(0.4, rel=1e-3)


def test_the_command_prints_a_table_and_json(full_store, capsys):
    code, out, err = run(capsys, "fidelity", full_store, "--candidates", "float16,top8-uint8-packed", "--rows", "64",
                         "--temperature", "2")
    assert code == 0, err
    rows = [line.split()[0] for line in out.splitlines()[2:4]]
    assert rows == ["float16", "top8-uint8-packed"] and "KL (T=2)" in out  # most faithful first
    code, out, err = run(capsys, "fidelity", full_store, "--candidates", "top8-float16", "--candidates",
                         "sample12-float16-packed", "--rows", "64", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert [e["name"] for e in r["candidates"]] == ["top8-float16", "sample12-float16-packed"]
    assert r["candidates"][1]["kl"] is None and r["temperature"] == 4.0  # inf is not JSON: null


@pytest.mark.parametrize("argv, hint", [
    (["--candidates", "top9000-float16"], "keeps 9000 classes of the teacher's 1000"),
    (["--candidates", "float17"], "unknown candidate 'float17'"),
    (["--candidates", "top8-int8"], "candidate 'top8-int8': --topk stores its values"),
    (["--candidates", "float16,float16"], "names one twice"),
    (["--split", "test"], "has no split 'test'"),
    (["--temperature", "0"], "must be a positive number"),
])
def test_bad_requests_are_one_line_errors(full_store, capsys, argv, hint):
    code, _, err = run(capsys, "fidelity", full_store, "--rows", "64", *argv)
    assert code == 2 and hint in err and len(err.strip().splitlines()) == 1, err


def test_a_store_without_the_full_targets_is_refused(full_store, tmp_path, capsys):
    top = convert_store(full_store, tmp_path / "top.zarr", topk=8, dtype="float16")
    code, _, err = run(capsys, "fidelity", top)
    assert code == 2 and "holds only the top 8 of 1000 logits" in err and len(err.strip().splitlines()) == 1
    int8 = convert_store(full_store, tmp_path / "i.zarr", dtype="int8")
    with pytest.raises(KDCacheError, match="holds int8 logits"):
        fidelity.measure(int8)


# ----------------------------------------------------------------------------- the budget


def test_the_default_grid_holds_every_kind_of_encoding_that_fits_the_classes():
    names = [fidelity.candidate_name(c) for c in fidelity.default_candidates(1000, 4.0)]
    assert {"float16", "bfloat16", "int8", "top32-float16", "top8-float16", "top32-uint8-packed", "top8-uint8-packed",
            "sample12-float16-packed"} <= set(names) and len(set(names)) == len(names)
    assert all(fidelity.parse_candidate(n, 1000, 4.0) == c for n, c in zip(names, fidelity.default_candidates(1000, 4.0)))
    small = [fidelity.candidate_name(c) for c in fidelity.default_candidates(10, 4.0)]
    assert "top8-float16" in small and not any(n.startswith(("top16", "top32", "top64")) for n in small)


@pytest.mark.parametrize("text, expected", [
    ("64B", (64, True)), ("64", (64, True)), ("2KB/sample", (2000, True)), ("1.5 KiB / sample", (1536, True)),
    ("40GB", (40e9, False)), ("1TiB", (2**40, False)), ("3mb", (3e6, False)),
])
def test_budgets_are_bytes_per_sample_or_a_total(text, expected):
    assert fidelity.parse_budget(text) == expected


@pytest.mark.parametrize("text", ["", "-5B", "0", "64 bytes", "GB"])
def test_a_budget_that_is_not_a_size_is_refused(text):
    with pytest.raises(KDCacheError, match="is not a size"):
        fidelity.parse_budget(text)


def test_choose_takes_the_most_faithful_candidate_that_fits(report):
    got = by_name(report)
    budget = got["top32-float16"]["bytes_per_sample"] + 1
    best, line = fidelity.choose(report, budget)
    fits = [e for e in report["candidates"] if e["bytes_per_sample"] <= budget]
    assert best["name"] in ("top32-float16", "top32-uint8-packed")  # the K = 32 codecs fit; dense ones do not
    assert best["kl"] == min(e["kl"] for e in fits) and "\n" not in line and best["name"] in line
    with pytest.raises(KDCacheError, match="raise --budget to at least"):
        fidelity.choose(report, 1.0)


def test_convert_budget_picks_records_and_inspect_shows_the_choice(full_store, tmp_path, capsys):
    dst = str(tmp_path / "b.zarr")
    convert_store(full_store, dst, budget="100B", candidates=SOME)
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("budget 100.0 B/sample:")]
    assert len(said) == 1 and "the most faithful of the 3 of 6 candidates that fit" in said[0]
    attrs = stores.open_store(dst).get_attrs()
    f = attrs["fidelity"]
    chosen = next(e for e in f["candidates"] if e["name"] == f["chosen"])
    fits = [e for e in f["candidates"] if e["bytes_per_sample"] <= 100]
    assert chosen["bytes_per_sample"] <= 100 and chosen["kl"] == min(e["kl"] for e in fits if e["kl"] is not None)
    assert fidelity.candidate_name(LogitCodec.from_attrs(attrs)) == f["chosen"]
    assert logit_bytes(dst) <= 100 * 1.1 and verify_store(dst) == []
    code, out, err = run(capsys, "inspect", dst)
    assert code == 0 and f"fidelity   {f['chosen']} chosen for --budget 100B" in out, err
    # a later convert of DST without a budget drops figures that no longer describe it
    again = convert_store(dst, tmp_path / "c.zarr", dtype="float16")
    assert "fidelity" not in stores.open_store(again).get_attrs()
    assert "fidelity" not in format_report(describe_store(again))


def test_a_total_budget_is_spread_over_every_sample(full_store, tmp_path):
    per_sample = fidelity.parse_budget("100B")[0]
    dst = convert_store(full_store, tmp_path / "t.zarr", budget=f"{per_sample * N / 1000:g}KB", candidates=SOME[2:])
    f = stores.open_store(dst).get_attrs()["fidelity"]
    assert f["budget_bytes_per_sample"] == pytest.approx(100) and f["why"].startswith(f"{f['budget']} over 512 samples")


@pytest.mark.parametrize("options, hint", [
    (dict(budget="100B", topk=8), "drop --topk"),
    (dict(budget="1B", candidates=["top8-uint8-packed"]), "no candidate fits 1.0 B/sample"),
    (dict(budget="lots"), "is not a size"),
])
def test_bad_budgets_are_refused_before_anything_is_written(full_store, tmp_path, options, hint):
    with pytest.raises(KDCacheError, match=hint):
        convert_store(full_store, tmp_path / "x.zarr", **options)
    assert not list(tmp_path.iterdir())


def test_convert_budget_on_the_command_line_refuses_a_chosen_encoding_in_one_line(full_store, tmp_path, capsys):
    code, _, err = run(capsys, "convert", full_store, str(tmp_path / "x.zarr"), "--budget", "64B", "--topk", "8")
    assert code == 2 and "--budget chooses the encoding itself; drop --topk" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- ranked by a probe student


DIGIT_CANDIDATES = ["float16", "top2-float16", "top1-float16"]


@pytest.fixture(scope="module")
def probed(fp32_cache) -> dict:
    from kdcache.probe import probe_candidates

    report = fidelity.measure(fp32_cache, candidates=DIGIT_CANDIDATES)
    small = by_name(report)["top2-float16"]["bytes_per_sample"]
    return probe_candidates(fp32_cache, report, budget=small, epochs=1)


def test_a_probe_is_a_real_run_of_the_student_from_each_candidate(probed, fp32_cache, tmp_path):
    from kdcache import train_student
    from kdcache.probe import PROBE_SEED, PROBE_STUDENT

    got = by_name(probed)
    assert got["float16"]["probe_top1"] is None  # it does not fit the budget: no probe spent on it
    assert probed["rank"] == "student" and probed["probe"] == {"student": PROBE_STUDENT, "epochs": 1, "seed": PROBE_SEED}
    top1 = convert_store(fp32_cache, tmp_path / "top1.zarr", topk=1, dtype="float16")
    again = train_student(cache=top1, students=[PROBE_STUDENT], epochs=1, seed=PROBE_SEED, temperature=4.0,
                          out=str(tmp_path / "run"))
    assert got["top1-float16"]["probe_top1"] == pytest.approx(again[0]["top1"], abs=1e-9)


def test_ranked_by_students_the_best_probe_wins_whatever_its_fidelity(probed):
    report = json.loads(json.dumps(probed))
    fits = [e for e in report["candidates"] if e["probe_top1"] is not None]
    least = max(fits, key=lambda e: e["kl"])  # the least faithful that fits gets the best probe
    for e in fits:
        e["probe_top1"] = 90.0 if e is least else 10.0
    best, line = fidelity.choose(report, max(e["bytes_per_sample"] for e in fits))
    assert best is least and "probe top-1 90.00" in line and "the best probe student (cnn_tiny, 1 epoch" in line
    report.pop("rank")
    assert fidelity.choose(report, max(e["bytes_per_sample"] for e in fits))[0] is not least  # by fidelity


def test_convert_rank_student_on_the_command_line_records_the_probes(fp32_cache, tmp_path, capsys):
    dst = tmp_path / "b.zarr"
    code, out, err = run(capsys, "convert", fp32_cache, dst, "--budget", "24B", "--rank", "student",
                         "--probe-epochs", "1")
    assert code == 0, err
    probes = [line for line in out.splitlines() if line.startswith("probe ")]
    f = stores.open_store(str(dst)).get_attrs()["fidelity"]
    fits = [e for e in f["candidates"] if e["bytes_per_sample"] <= 24]
    assert len(probes) == len(fits) > 1 and f["rank"] == "student"
    chosen = next(e for e in f["candidates"] if e["name"] == f["chosen"])
    assert chosen["probe_top1"] == max(e["probe_top1"] for e in fits)
    code, out, _ = run(capsys, "inspect", dst)
    assert code == 0 and "ranked by a probe student (cnn_tiny, 1 epoch, seed 1000)" in out


@pytest.mark.parametrize("argv, hint", [
    (["--rank", "student"], "--rank student ranks the candidates of --budget; add --budget"),
    (["--budget", "24B", "--dataset", "digits"], "--dataset and --data-root feed the probes of --rank student"),
    (["--budget", "24B", "--rank", "student", "--probe-epochs", "0"], "--probe-epochs 0 must be a positive"),
    (["--budget", "24B", "--rank", "student", "--probe-student", "nope"], "nope"),
])
def test_probe_options_out_of_place_are_one_line(fp32_cache, tmp_path, capsys, argv, hint):
    code, _, err = run(capsys, "convert", fp32_cache, tmp_path / "x.zarr", *argv)
    assert code == 2 and hint in one_line(err)
    assert not list(tmp_path.iterdir())


def test_probes_train_on_the_stores_own_dataset_never_on_code_it_names():
    from kdcache.probe import _dataset_of

    stored = {"train": {"dataset": {"name": "digit-pairs:size=200"}}, "config": {"data_root": "/data"}}
    assert _dataset_of("s.zarr", stored, None, None) == ("digit-pairs:size=200", "/data")
    assert _dataset_of("s.zarr", stored, "fake:size=8", None) == ("fake:size=8", None)  # the user's, as given
    with pytest.raises(KDCacheError, match="pass the probes' data with --dataset"):
        _dataset_of("s.zarr", {"train": {"dataset": {"name": "os:system"}}}, None, None)


def test_a_probe_trains_long_enough_to_learn_something_by_default():
    from kdcache.probe import PROBE_STEPS, auto_epochs

    assert auto_epochs(20_000) == 1  # digit-pairs: 313 steps of 64 in one epoch
    assert auto_epochs(1_437) == 14 and 14 * 23 >= PROBE_STEPS > 13 * 23  # digits: 23 steps an epoch
    assert auto_epochs(1) == PROBE_STEPS
