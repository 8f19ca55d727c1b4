"""Which row `--best` picks (within the budget, at the longest fidelity), and where the split and the schedule come from."""

from __future__ import annotations

import copy

import pyarrow as pa
import pytest
import torch

from widthsearch import load_data, load_model
from widthsearch.app.config import SearchConfig
from widthsearch.data import check_split
from widthsearch.errors import DataSourceError, WidthSearchError
from widthsearch.results import SCHEMA, choose_trial, ranked
from widthsearch.training import StepTrainer, TrainConfig, train


def table(*rows: dict) -> pa.Table:
    full = [{"trial_id": f"t{i}", "status": "ok", "error": None, "payload": None, **r} for i, r in enumerate(rows)]
    return pa.Table.from_pylist(full, schema=SCHEMA)


def test_best_never_returns_a_row_over_the_budget():
    # an aofp-like trajectory (unpruned first version scores best) and a gradient-like over-budget lam
    rows = table({"score": 0.95, "flops_ratio": 1.0, "cost_ratio": 1.0, "steps_reached": 50},
                 {"score": 0.93, "flops_ratio": 0.62, "cost_ratio": 0.62, "steps_reached": 50},
                 {"score": 0.90, "flops_ratio": 0.49, "cost_ratio": 0.49, "steps_reached": 50},
                 {"score": 0.91, "flops_ratio": 0.5004, "cost_ratio": 0.5004, "steps_reached": 50},
                 {"score": 0.88, "flops_ratio": 0.45, "cost_ratio": 0.45, "steps_reached": 50})
    assert choose_trial(rows, budget=0.5)["trial_id"] == "t2"
    assert choose_trial(rows, budget=0.7)["trial_id"] == "t1"
    with pytest.raises(WidthSearchError, match=r"no successful trial within the budget 0.4 \(flops\).*smallest ratio"):
        choose_trial(rows, budget=0.4)


def test_best_compares_like_with_like_across_fidelities():
    rows = table({"score": 0.80, "cost_ratio": 0.5, "flops_ratio": 0.5, "steps_reached": 100},
                 {"score": 0.70, "cost_ratio": 0.5, "flops_ratio": 0.5, "steps_reached": 100},
                 {"score": 0.60, "cost_ratio": 0.5, "flops_ratio": 0.5, "steps_reached": 25},   # stopped early:
                 {"score": 0.85, "cost_ratio": 0.6, "flops_ratio": 0.6, "steps_reached": 400})  # over budget
    assert choose_trial(rows, budget=0.5)["trial_id"] == "t0"
    cheap = table({"score": 0.9, "cost_ratio": 0.5, "flops_ratio": 0.5, "steps_reached": 25},
                  {"score": 0.7, "cost_ratio": 0.5, "flops_ratio": 0.5, "steps_reached": 100})
    assert choose_trial(cheap, budget=0.5)["trial_id"] == "t1"  # the promoted trial, not the cheap high score


def test_the_ranking_rule_orders_by_fidelity_score_then_cost_once_per_profile():
    rows = table({"score": 0.80, "cost_ratio": 0.5, "flops_ratio": 0.5, "steps_reached": 50, "widths": [1, 2]},
                 {"score": 0.70, "cost_ratio": 0.4, "flops_ratio": 0.4, "steps_reached": 200, "widths": [1, 1]},
                 {"score": 0.70, "cost_ratio": 0.3, "flops_ratio": 0.3, "steps_reached": 200, "widths": [2, 1]},
                 {"score": 0.90, "cost_ratio": 0.5, "flops_ratio": 0.5, "steps_reached": 50, "widths": [1, 1]},
                 {"score": float("nan"), "cost_ratio": 0.1, "flops_ratio": 0.1, "steps_reached": 0, "widths": [3, 3]},
                 {"score": 0.99, "cost_ratio": 0.9, "flops_ratio": 0.9, "steps_reached": 50, "widths": [2, 2]},
                 {"status": "error", "score": None, "cost_ratio": 0.1, "flops_ratio": 0.1, "widths": [1, 3]})
    assert [r["trial_id"] for r in ranked(rows, 0.5)] == ["t2", "t1", "t0"]  # t3 repeats t1's profile
    assert [r["trial_id"] for r in ranked(rows, 0.5, distinct=False)] == ["t2", "t1", "t3", "t0"]
    assert [r["trial_id"] for r in ranked(rows)] == ["t2", "t1", "t5", "t0"]
    assert choose_trial(rows, budget=0.5)["trial_id"] == ranked(rows, 0.5)[0]["trial_id"]


def test_pareto_experiments_need_a_bound_and_params_constraints_use_cost_ratio():
    rows = table({"score": 0.9, "cost_ratio": 0.3, "flops_ratio": 0.6, "steps_reached": 10})
    with pytest.raises(WidthSearchError, match="Pareto front.*--budget R"):
        choose_trial(rows, budget=None)
    assert choose_trial(rows, budget=0.35, constraint="params")["trial_id"] == "t0"  # params ratio 0.3


def test_a_checkpoint_from_another_split_is_refused_naming_both_splits():
    ten = load_data("digits", val_fraction=0.1, seed=0).split
    twenty = load_data("digits", val_fraction=0.2, seed=0).split
    other_seed = load_data("digits", val_fraction=0.1, seed=1).split
    assert check_split(ten, load_data("digits", val_fraction=0.1, seed=0).split, "base.pt") is None
    for recorded in (twenty, other_seed):
        with pytest.raises(DataSourceError) as info:
            check_split(recorded, ten, "base.pt")
        text = str(info.value)
        assert "checkpoint base.pt was trained on another train/val split" in text
        assert f"val_fraction {recorded['val_fraction']}, split_seed {recorded['split_seed']}" in text
        assert "val_fraction 0.1, split_seed 0" in text
    assert "records no train/val split" in check_split(None, ten, "old.pt")


def test_search_seed_does_not_move_the_split():
    a, b = SearchConfig(seed=0), SearchConfig(seed=5)
    assert a.split_seed == b.split_seed == 0


def test_one_fine_tune_is_one_schedule_whatever_the_chunks():
    data = load_data("digits", val_fraction=0.1, seed=0)
    torch.manual_seed(0)
    model = load_model("small_cnn", data.num_classes, in_channels=data.in_channels)
    whole, chunked = copy.deepcopy(model), copy.deepcopy(model)
    config = TrainConfig(lr=0.05, batch_size=32)
    train(whole, data, steps=40, config=config, seed=3)
    trainer = StepTrainer(chunked, data, 40, config, seed=3)
    for chunk in (10, 10, 5, 15, 99):  # the last asks for more than remains
        trainer.run(chunk)
    assert trainer.done == 40
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # one cosine, ended once
    for p, q in zip(whole.state_dict().values(), chunked.state_dict().values()):
        assert torch.allclose(p.float(), q.float(), atol=1e-6)


def test_promotion_rungs_follow_the_reduction_factor():
    assert SearchConfig(asha=True, finetune_steps=100, min_finetune_steps=10, reduction_factor=3).rungs() == \
        [10, 30, 90, 100]
    assert SearchConfig(asha=False, finetune_steps=100).rungs() == [100]
    with pytest.raises(Exception, match="min_finetune_steps"):
        SearchConfig(asha=True, finetune_steps=20, min_finetune_steps=40)
