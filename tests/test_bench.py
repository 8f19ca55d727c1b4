"""The benchmark's own contracts (bench/ is not the product, but its cells are the proof)."""

from __future__ import annotations

import pytest


def test_bench_refuses_to_resume_a_cell_measured_on_another_base(tmp_path):
    """A base trained again (another CPU, a new checkout's empty cache) is another model: the bench's cells of the
    old one must not be resumed or extended as if they paired; a cell of the same base, or one that does not say,
    passes."""
    from bench.common import check_same_base

    info = {"model": "cifar_resnet20", "val_acc": 0.7662, "test_acc": 0.7532, "base_id": "0123456789"}
    path = tmp_path / "cifar_resnet20-uniform-b0.1-s0.json"
    check_same_base({"base_info": dict(info)}, info, path)
    check_same_base({"method": "uniform"}, info, path)
    old = {"base_info": {"val_acc": 0.7404, "test_acc": 0.7473, "cpu": "Intel Xeon"}}
    with pytest.raises(SystemExit, match=r"cifar_resnet20-uniform-b0.1-s0.json was measured on another cifar_resnet20 "
                                         r"base \(val 0.7404, test 0.7473, trained on Intel Xeon\)"):
        check_same_base(old, info, path)
    with pytest.raises(SystemExit, match="measured on another cifar_resnet20 base"):  # same accuracy, other weights
        check_same_base({"base_info": {**info, "base_id": "9876543210"}}, info, path)


def test_a_base_kept_in_git_is_found_before_the_cache(tmp_path, monkeypatch):
    """bench/checkpoints/ (in git) comes before bench/cache/ (a new checkout's is empty): the bench reuses the kept
    base instead of training another model on this machine."""
    import hashlib
    import json

    from bench import common

    kept, cache = tmp_path / "kept", tmp_path / "cache"
    monkeypatch.setattr(common, "KEPT", kept)
    monkeypatch.setattr(common, "CACHE", cache)
    stem = common.base_stem("cifar_resnet20", "npz:/data/cifar10-5k.npz", 80)
    for folder, acc in ((cache, 0.5), (kept, 0.7)):
        folder.mkdir()
        (folder / f"{stem}.pt").write_bytes(b"weights")
        (folder / f"{stem}.json").write_text(json.dumps({"val_acc": acc}))
    ckpt, info = common.base_checkpoint("cifar_resnet20", "npz:/data/cifar10-5k.npz")
    digest = hashlib.sha256(b"weights").hexdigest()[:10]  # the base's identity: its checkpoint's digest
    assert ckpt == kept / f"{stem}.pt" and info == {"val_acc": 0.7, "base_id": digest}
    (kept / f"{stem}.json").unlink()  # a checkpoint without its info is not a kept base
    assert common.base_checkpoint("cifar_resnet20", "npz:/data/cifar10-5k.npz")[0] == cache / f"{stem}.pt"


def test_the_quality_report_keeps_each_base_and_recipe_in_its_own_table(tmp_path, monkeypatch):
    """Cells of two bases or two retrain recipes never share a table (their paired differences would mix models),
    and the missing cells are those of the base and recipe the bench would use now: the first table's cells, of a
    base no checkout has, and cells of another recipe do not count as done."""
    import json

    import numpy as np

    from bench import common, report

    def cell(method, seed, base_id, acc, epochs=20):
        bits = np.random.default_rng(seed).random(report.IMAGES) < acc
        info = {"val_acc": 0.74, "test_acc": 0.75, "epochs": 80, "train_s": 1000.0, "cpu_s": 1000.0,
                "loadavg_1m": 1.0, **({"base_id": base_id, "cpu": "AMD EPYC"} if base_id else {})}
        return {"method": method, "budget": 0.1, "seed": seed, "model": "cifar_resnet20", "base_info": info,
                "flops_ratio": 0.1, "params": 24000, "retrain_s": 100.0, "batch1_ms": 1.0, "loadavg_1m": 1.0,
                "conv_widths": [5, 5], "retrains": [{"seed": 0, "test_acc": float(bits.mean())}], "retrain_seeds": [0],
                "test_correct": [np.packbits(bits).tobytes().hex()], "retrain_epochs": epochs, "retrain_lr": 0.05}

    quality = tmp_path / "quality"
    for recipe in ("20x0.05", "40x0.05"):
        (quality / "abc" / recipe).mkdir(parents=True)
    (quality / "cifar_resnet20-uniform-b0.1-s0.json").write_text(json.dumps(cell("uniform", 0, None, 0.6)))
    (quality / "abc" / "20x0.05" / "cifar_resnet20-uniform-b0.1-s0.json").write_text(
        json.dumps(cell("uniform", 0, "abc", 0.7)))
    (quality / "abc" / "40x0.05" / "cifar_resnet20-uniform-b0.1-s0.json").write_text(
        json.dumps(cell("uniform", 0, "abc", 0.8, epochs=40)))
    monkeypatch.setattr(common, "current_base_id", lambda model: "abc" if model == "cifar_resnet20" else None)
    monkeypatch.setattr(common, "QUALITY_RECIPE", "40x0.05")
    text = "\n".join(report.quality_section(tmp_path))
    assert "### cifar_resnet20 at FLOPs 0.1, retrain 20x0.05\n" in text  # the first table's cells
    assert "### cifar_resnet20 at FLOPs 0.1, base abc (AMD EPYC), retrain 20x0.05\n" in text
    assert "### cifar_resnet20 at FLOPs 0.1, base abc (AMD EPYC), retrain 40x0.05\n" in text
    assert "cifar_resnet20 abc" in text and "cifar_resnet56 none yet, to be trained" in text
    # planned at FLOPs 0.1 and 0.05: uniform done at 0.1 on the current base and recipe only
    assert "* cifar_resnet20 uniform: 1 cell(s)" in text and "* cifar_resnet20 global: 2 cell(s)" in text
    monkeypatch.setattr(common, "QUALITY_RECIPE", "60x0.05")
    assert "* cifar_resnet20 uniform: 2 cell(s)" in "\n".join(report.quality_section(tmp_path))
    monkeypatch.setattr(common, "QUALITY_RECIPE", "40x0.05")
    monkeypatch.setattr(common, "current_base_id", lambda model: None)
    assert "* cifar_resnet20 uniform: 2 cell(s)" in "\n".join(report.quality_section(tmp_path))


def test_optuna_rows_keep_their_meaning_when_a_default_changes():
    """Each optuna row pins the options that became defaults after it: the synflow warm starts only where the row
    names them (optuna-synflow), the width exponents only from optuna-widthexp on."""
    from bench import quality

    def options(method):
        return quality.method_config(method)["searcher_options"]

    for method in ("optuna", "optuna-tuned", "optuna-spread3", "optuna-widthexp", "optuna-fill"):
        assert options(method)["synflow_warm_starts"] == 0, method
    assert options("optuna-synflow")["synflow_warm_starts"] == 3
    assert options("optuna")["width_exponents"] is None and options("optuna")["spread"] is None
    assert options("optuna-widthexp")["width_exponents"] == [0.5, 1.0]


def test_each_default_row_runs_its_searcher_with_todays_defaults():
    """bench/quality.DEFAULT_ROWS names the row that measures a searcher as users get it: its trial settings are
    SearchConfig's defaults and its searcher options the searcher's declared defaults (optuna's automatic synflow
    warm starts resolved as the application resolves them, the model being given); a default that changes without
    a new row fails here."""
    import dataclasses

    from bench import quality
    from searchers.options import SYNFLOW_WARM_STARTS, check
    from widthsearch.app.config import SearchConfig

    defaults = {f.name: f.default for f in dataclasses.fields(SearchConfig)}
    for searcher, row in quality.DEFAULT_ROWS.items():
        config = quality.method_config(row)
        assert config["searcher"] == searcher
        for field in ("finetune_steps", "finetune_lr", "bn_batches", "score", "asha", "rescore_top", "num_samples"):
            assert config[field] == defaults[field], (row, field)
        declared = check(searcher, {})
        if searcher == "optuna" and declared["synflow_warm_starts"] is None:
            declared["synflow_warm_starts"] = SYNFLOW_WARM_STARTS
        assert check(searcher, config.get("searcher_options", {})) == declared, row


def test_a_filled_row_is_its_row_with_the_budget_fill_and_a_filled_uniform_does_not_search(tmp_path, monkeypatch):
    """uniform-fill and optuna-fill are rows uniform and optuna-widthexp with --fill-budget; uniform-fill is one of
    the methods that do not search, so a search is held against it where it is the best of them."""
    import json

    import numpy as np

    from bench import common, quality, report

    assert quality.method_config("optuna-fill") == {**quality.method_config("optuna-widthexp"), "fill_budget": True}
    assert "fill_budget" not in quality.method_config("optuna-widthexp")

    def cell(method, acc):
        bits = np.random.default_rng(len(method)).random(report.IMAGES) < acc
        info = {"val_acc": 0.74, "test_acc": 0.75, "epochs": 80, "train_s": 1000.0, "cpu_s": 1000.0,
                "loadavg_1m": 1.0, "base_id": "abc", "cpu": "AMD EPYC"}
        return {"method": method, "budget": 0.1, "seed": 0, "model": "cifar_resnet20", "base_info": info,
                "flops_ratio": 0.1, "params": 24000, "retrain_s": 100.0, "batch1_ms": 1.0, "loadavg_1m": 1.0,
                "conv_widths": [5, 5], "retrains": [{"seed": 0, "test_acc": float(bits.mean())}], "retrain_seeds": [0],
                "test_correct": [np.packbits(bits).tobytes().hex()], "retrain_epochs": 40, "retrain_lr": 0.05,
                "trials": 16, "trial_cpu_s": 100.0}

    folder = tmp_path / "quality" / "abc" / "40x0.05"
    folder.mkdir(parents=True)
    for method, acc in (("uniform", 0.5), ("uniform-fill", 0.7), ("optuna-fill", 0.6)):
        (folder / f"cifar_resnet20-{method}-b0.1-s0.json").write_text(json.dumps(cell(method, acc)))
    monkeypatch.setattr(common, "current_base_id", lambda model: "abc" if model == "cifar_resnet20" else None)
    text = "\n".join(report.quality_section(tmp_path))
    assert "best searcher optuna-fill, best plain uniform-fill:" in text
    assert "| uniform-fill | 1 x 1 |" in text and "uniform-fill: row uniform with --fill-budget" in text


def test_a_quality_cell_is_never_extended_with_another_recipe(tmp_path, monkeypatch, capsys):
    """More retrain seeds for a cell come from its own recipe; a cell of another recipe (moved by hand into the
    wrong folder) is refused with both recipes named, and a malformed --recipe fails before any base loads."""
    import sys

    from bench import quality

    path = tmp_path / "cell.json"
    quality.check_same_recipe({"retrain_epochs": 40, "retrain_lr": 0.05}, 40, 0.05, path)
    quality.check_same_recipe({"error": "x"}, 40, 0.05, path)  # a failed cell holds no retrain
    with pytest.raises(SystemExit, match="cell.json was retrained with 20x0.05, not 40x0.05"):
        quality.check_same_recipe({}, 40, 0.05, path)  # cells before the option: 20 epochs at lr 0.05
    assert quality.cell_folder("abc", "40x0.05").parts[-3:] == ("quality", "abc", "40x0.05")
    monkeypatch.setattr(quality, "bench_base", lambda *a: pytest.fail("the base loaded before the check"))
    monkeypatch.setattr(sys, "argv", ["quality", "--recipe", "40-0.05"])
    with pytest.raises(SystemExit):
        quality.main()
    assert "--recipe: recipe '40-0.05': expected EPOCHSxLR" in capsys.readouterr().err


def test_retrain_noise_pools_each_profiles_seed_spread_and_the_report_shows_it(tmp_path):
    """The recipe study's figure is the within-profile std over retrain seeds, pooled over profiles (the spread
    between profiles is not noise), per recipe; the report gives a row per profile and the pooled one."""
    import json
    import statistics

    from bench.report import retrain_noise_section
    from bench.retrain_noise import summary

    runs = {"uniform:0": [{"seed": s, "val_acc": v, "test_acc": v - 0.01, "train_s": 100.0,
                             "loadavg_1m": 1.0, "date": "2026-12-07"} for s, v in enumerate((0.60, 0.62, 0.52))],
            "optuna:2": [{"seed": s, "val_acc": v, "test_acc": v, "train_s": 90.0, "loadavg_1m": 2.0,
                          "date": "2026-12-07"} for s, v in enumerate((0.70, 0.72))]}
    out = summary(runs)
    pooled = out["val_acc"]["pooled_std"]
    expect = ((2 * statistics.variance([0.60, 0.62, 0.52]) + statistics.variance([0.70, 0.72])) / 3) ** 0.5
    assert pooled == pytest.approx(expect) and pooled < statistics.stdev([0.60, 0.62, 0.52, 0.70, 0.72])
    assert out["val_acc"]["profiles"]["uniform:0"]["min"] == 0.52
    folder = tmp_path / "retrain_noise" / "0123456789"
    folder.mkdir(parents=True)
    for recipe, epochs, lr, shift in (("20x0.05", 20, 0.05, 0.0), ("40x0.05", 40, 0.05, 0.01)):
        moved = {p: [{**r, "val_acc": r["val_acc"] + shift} for r in rs] for p, rs in runs.items()}
        (folder / f"cifar_resnet20-b0.1-{recipe}.json").write_text(json.dumps({
            "model": "cifar_resnet20", "budget": 0.1, "recipe": recipe, "epochs": epochs, "lr": lr,
            "base_info": {"base_id": "0123456789", "cpu": "AMD EPYC"}, "runs": moved, "summary": summary(moved)}))
    text = "\n".join(retrain_noise_section(tmp_path))
    assert text.count("### cifar_resnet20 at FLOPs 0.1, base 0123456789 (AMD EPYC)") == 1  # both recipes, one table
    assert "| 20x0.05 | uniform:0 | 3 | 0.5800 ± 0.0529 | 0.5200 |" in text
    assert "| 40x0.05 | uniform:0 | 3 | 0.5900 ± 0.0529 | 0.5300 |" in text
    assert text.index("| 20x0.05 | uniform:0") < text.index("| 40x0.05 | uniform:0")
    assert f"| 20x0.05 | pooled std | | {100 * expect:.2f} points |" in text


def test_retrain_noise_writes_merge_what_another_process_added(tmp_path):
    """Two processes running the same recipe read the file before either wrote: each write keeps the other's
    seeds and profiles, and the summary covers all of them."""
    import json

    from bench.retrain_noise import add_run

    path = tmp_path / "cifar_resnet20-b0.1-40x0.05.json"

    def fresh():
        return {"model": "cifar_resnet20", "budget": 0.1, "recipe": "40x0.05", "runs": {}}

    def run(seed, val):
        return {"seed": seed, "val_acc": val, "test_acc": val, "train_s": 1.0, "loadavg_1m": 1.0, "date": "d"}

    a, b = fresh(), fresh()
    a = add_run(path, a, "uniform:0", run(0, 0.60))
    b = add_run(path, b, "uniform:0", run(3, 0.64))
    a = add_run(path, a, "optuna:2", run(1, 0.70))
    on_disk = json.loads(path.read_text())
    assert [r["seed"] for r in on_disk["runs"]["uniform:0"]] == [0, 3]
    assert [r["seed"] for r in on_disk["runs"]["optuna:2"]] == [1]
    assert on_disk["summary"]["val_acc"]["profiles"]["uniform:0"]["n"] == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_retrain_noise_refuses_a_malformed_recipe_naming_it():
    from bench.common import parse_recipe

    assert parse_recipe("40x0.05") == (40, 0.05)
    for bad in ("20-0.05", "0x0.05", "20x0", "20x-0.1", "twentyx0.05"):
        with pytest.raises(ValueError, match=f"recipe '{bad}': expected EPOCHSxLR with EPOCHS >= 1 and LR > 0"):
            parse_recipe(bad)


def test_the_paired_difference_counts_every_retrain_of_both_sides():
    """A reference with more retrains than a search seed is compared whole (its mean over all its retrains, image
    by image), not only on the retrain seeds both share; the interval covers the true difference; a side without
    retrains is refused."""
    import numpy as np

    from bench.stats import nested_paired_difference

    rng = np.random.default_rng(0)
    images = 4000

    def retrain(p):
        return rng.random(images) < p

    # the reference's seeds 0-2 are lucky (0.70); its ten retrains average 0.64; the method's are all 0.66
    ref = {r: retrain(0.70 if r < 3 else 0.614) for r in range(10)}
    ours = {0: {r: retrain(0.66) for r in range(3)}, 1: {r: retrain(0.66) for r in range(3)}}
    d = nested_paired_difference(ours, ref, reps=400)
    expect = np.mean([m.mean() for s in ours.values() for m in s.values()]) - np.mean([m.mean() for m in ref.values()])
    assert d["diff"] == pytest.approx(expect) and d["diff"] > 0.01  # seed-paired, it would be about -0.04
    assert d["low"] < 0.66 - (3 * 0.70 + 7 * 0.614) / 10 < d["high"]  # the true difference, +2.0 points
    assert d["search_seeds"] == 2 and d["retrains"] == 6 and d["reference_retrains"] == 10
    assert set(d["per_search_seed"]) == {0, 1}
    with pytest.raises(ValueError, match="a method without retrains"):
        nested_paired_difference(ours, {})


def test_the_fidelity_report_keeps_each_ground_truth_recipe_apart_and_ranks_the_scores_without_training(tmp_path):
    """One-budget fidelity cells of a recipe (fidelity/BASE_ID/RECIPE/) get their own table, named by base and
    recipe, with a row per score that needs no training (the cell's proxies; their cost: their seconds); a variant that ranks perfectly at <= 10% of a
    retrain is named as the cheapest that meets Spearman 0.8."""
    import json

    from bench.report import fidelity_budget_section

    folder = tmp_path / "fidelity" / "abc" / "40x0.05"
    folder.mkdir(parents=True)
    for i in range(6):
        metrics = {"val_acc": 0.2 + 0.01 * i, "val_loss": 2.0 - 0.1 * i, "val10_acc": 0.3, "val10_loss": 2.0}
        (folder / f"cifar_resnet20-{i}.json").write_text(json.dumps({
            "study": "b0.1", "source": "uniform" if i == 1 else "random", "model": "cifar_resnet20", "widths": [i + 1, 2], "keep": None,
            "base_info": {"val_acc": 0.74, "test_acc": 0.73}, "flops_ratio": 0.1, "retrain_epochs": 40,
            "retrain_seeds": [0, 1], "retrain_s": 200.0, "test_acc": 0.6 + 0.01 * i, "retrain_val_acc": 0.6 + 0.005 * i,
            "test_accs": [0.6 + 0.01 * i - 0.005, 0.6 + 0.01 * i + 0.005],
            "proxies": {"params": {"score": 30000.0 - 100 * i, "seconds": 2.0}},
            "scores": {"k50": {**metrics, "seconds": 10.0}, **({"k100": {**metrics, "seconds": 20.0}} if i else {})}}))
    assert fidelity_budget_section(tmp_path, 0.1, "abc") == []  # the base's folder holds no cell itself
    text = "\n".join(fidelity_budget_section(tmp_path, 0.1, "abc", "40x0.05"))
    assert "## Does the trial score rank profiles at FLOPs 0.1, base abc, retrain 40x0.05?" in text
    assert "(40 epochs from the pruned weights)" in text
    assert "| params (no training) | -1.000 [" in text and "| 1.0% |" in text
    assert "| k50 val_acc | 1.000 [" in text
    assert "Cheapest variant with Spearman >= 0.8 at <= 10% of a retrain: k50 on val_acc" in text
    assert "would reach a Spearman of about 0." in text
    assert "Left out, not measured on every profile yet (bench/fidelity.py --fill adds them): k100." in text
    assert ("Room above uniform among these profiles (test, the same retrain seeds; uniform: 0.610): the profile "
            "with the best retrained val accuracy (random) retrains to 0.650 (+4.00 points), the best on test "
            "(random; an upper bound, chosen on test) to 0.650 (+4.00).") in text


def test_fidelity_shards_split_the_profiles_and_a_bad_shard_is_refused_naming_it():
    from bench.fidelity import parse_shard

    assert parse_shard("1/2") == (1, 2) and parse_shard("0/1") == (0, 1)
    for bad in ("2/2", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match=f"shard '{bad}': expected I/N with 0 <= I < N"):
            parse_shard(bad)


def test_the_spearman_ceiling_falls_with_the_retrain_seeds_noise():
    """No seed noise -> 1; noise far below the spread -> near 1; noise as large as the spread -> 0; profiles with one
    seed say nothing about the noise; one outlying profile counts as one rank, not as the whole spread."""
    from bench.stats import spearman_ceiling

    assert spearman_ceiling([[0.60, 0.60], [0.62, 0.62], [0.64, 0.64]], reps=200) == pytest.approx(1.0)
    steady = [[0.60 + 0.02 * i - 0.001, 0.60 + 0.02 * i + 0.001] for i in range(10)]
    assert spearman_ceiling(steady, reps=200) > 0.95
    assert spearman_ceiling([[0.5, 0.7], [0.7, 0.5], [0.6, 0.6]], reps=200) == 0.0
    assert spearman_ceiling([[0.6], [0.7], [0.8], [0.6, 0.7]], reps=200) is None
    noisy = [[0.66 + 0.002 * i - 0.015, 0.66 + 0.002 * i + 0.015] for i in range(10)]
    low = spearman_ceiling(noisy + [[0.50, 0.50]], reps=200)
    assert low is not None and low < 0.6  # a linear ceiling (root of the reliability) would be above 0.9


def test_the_scores_without_training_are_measured_on_the_pruned_model_and_leave_the_base_alone():
    """bench/fidelity.py proxies on digits: every name in PROXIES with a finite score and its own seconds; the
    parameter count is the pruned model's; a wider profile has more parameters and more synaptic flow; the base
    model's weights and BN statistics are what they were."""
    import math

    import torch

    from bench.fidelity import PROXIES, proxies
    from widthsearch import build_space, load_model, prune
    from widthsearch.data import load_data

    data = load_data("digits")
    torch.manual_seed(0)
    base = load_model("small_cnn", in_channels=1)
    space = build_space(base, torch.randn(1, *data.train.x.shape[1:]))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    narrow, wide = ({"widths": [int(w) for w in space.widths * r]} for r in (0.25, 0.75))
    scores = {name: proxies(base, space, p, data, seed=0) for name, p in (("narrow", narrow), ("wide", wide))}
    for out in scores.values():
        assert set(out) == set(PROXIES)
        assert all(math.isfinite(v["score"]) and v["seconds"] >= 0 for v in out.values())
    pruned = prune(base, space, space.from_vector(wide["widths"]), "l1")
    assert scores["wide"]["params"]["score"] == sum(t.numel() for t in pruned.parameters())
    assert scores["wide"]["params"]["score"] > scores["narrow"]["params"]["score"]
    assert scores["wide"]["synflow"]["score"] > scores["narrow"]["synflow"]["score"] > 0
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_the_composition_table_sets_each_whole_model_against_its_units_and_weight_bytes():
    import torch

    from bench.latency import weight_mb
    from bench.report import composition_lines

    assert weight_mb(torch.nn.Linear(1024, 256)) == pytest.approx((1024 * 256 + 256) * 4 / 2**20)
    cell = {"model": "cifar_vgg16", "batch": 1, "runtime": "onnxruntime", "divisor": 16, "date": "2026-12-07 21:00",
            "rows": [{"flops_ratio": 0.05}, {"flops_ratio": 0.5}, {"flops_ratio": 0.9}],
            "residuals": {"profiles": [0, 2],
                          "whole": [{"measured_ms": 0.44, "units_exact_ms": 0.48, "weight_mb": 2.9},
                                    {"measured_ms": 8.0, "units_exact_ms": 5.0, "cold_share": 1.0,
                                     "units_mixed_ms": 7.6}]}}
    lines = composition_lines([cell, {**cell, "residuals": None}])
    rows = [line for line in lines if line.startswith("| cifar_vgg16")]
    assert rows == ["| cifar_vgg16 (divisor 16) | 1 | onnxruntime | 0.05 | 2.9 | 0.480 | 0.440 | 0.92 | - | - | - | "
                    "2026-12-07 21:00 |",
                    "| cifar_vgg16 (divisor 16) | 1 | onnxruntime | 0.90 | - | 5.000 | 8.000 | 1.60 | 1.00 | 7.600 | "
                    "1.05 | 2026-12-07 21:00 |"]
    assert composition_lines([{**cell, "residuals": None}]) == []
