"""Where a trial's wall time goes: a real search's rows, phase by phase (the trials' own `phase_s`).

Runs an Optuna search (concurrency 2, one CPU per trial) on the demo (small_cnn on digits, base trained by
the search) and on the cifar_resnet20 bench base at FLOPs 0.1, then sums every trial's phases: `start` (the
driver started the trial -> its body ran: actor start, job transfer), `setup` (threads, device, data),
`prune`, `bn` (adaptive-BN recalibration), `finetune`, `eval`, `finish` (last report -> row written); and
the search's wall time x concurrency against the trials' time. One JSON per setting in
bench/results/trial_time/.

    python -m bench.trial_time [--settings demo r20-0.1] [--trials 16] [--finetune-steps 50] [--tag=-after]

(`--tag=-x`, with the equals sign: argparse reads a separate `-x` as an option.)

Also the trials' CPU-seconds, against the base's training CPU-seconds where the bench trained the base.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from bench.common import DEFAULT_DATA, RESULTS, SPLIT_SEED, VAL_FRACTION, base_checkpoint, machine_load
from bench.quality import trial_compute
from widthsearch import Search

PHASES = ("start", "setup", "prune", "bn", "finetune", "eval", "finish")


def settings(args) -> dict[str, tuple[dict, float | None]]:
    """Per setting: the search's fields and its base's training CPU-seconds (None: the demo trains its own)."""
    out = {"demo": (dict(model="small_cnn", data="digits", budget=0.5), None)}
    if "r20-0.1" in args.settings:
        ckpt, info = base_checkpoint("cifar_resnet20", args.data)
        out["r20-0.1"] = (dict(model="cifar_resnet20", checkpoint=str(ckpt), data=args.data, budget=0.1,
                               val_fraction=VAL_FRACTION, split_seed=SPLIT_SEED), info.get("cpu_s"))
    return {k: v for k, v in out.items() if k in args.settings}


def measure(name: str, fields: dict, args) -> dict:
    with tempfile.TemporaryDirectory() as storage:
        run = Search(name=name, storage=storage, searcher="optuna", num_samples=args.trials, concurrency=2,
                     cpus_per_trial=1, finetune_steps=args.finetune_steps, **fields)
        start = time.time()
        table = run.fit(progress=False)
        wall = time.time() - start
    rows = [r for r in table.to_pylist() if r["status"] == "ok"]
    phases = {p: 0.0 for p in PHASES}
    for r in rows:
        for key, value in r["phase_s"] or []:
            phases[key] = phases.get(key, 0.0) + value
    trial_s = sum(phases.values())
    first = min(r["started_at"].timestamp() - dict(r["phase_s"] or []).get("start", 0.0) for r in rows)
    window = max(r["finished_at"].timestamp() for r in rows) - first  # the Tune run, from its first trial's start
    return {"setting": name, "config": run.config.to_dict(), "trials": len(rows), "search_wall_s": wall,
            "tune_window_s": window, "slots_s": window * run.config.concurrency, "trial_s": trial_s,
            "slot_use": trial_s / (window * run.config.concurrency), "phase_s": phases,
            "share": {k: v / trial_s for k, v in phases.items()},
            "train_and_eval_share": (phases["finetune"] + phases["eval"]) / trial_s,
            "with_bn_share": (phases["finetune"] + phases["eval"] + phases["bn"]) / trial_s,
            "median_trial_wall_s": sorted(r["wall_s"] for r in rows)[len(rows) // 2],
            "trial_cpu_s": trial_compute(rows, run.config.cpus_per_trial)["trial_cpu_s"],
            "loadavg_1m": machine_load(), "date": time.strftime("%Y-%m-%d %H:%M")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["demo", "r20-0.1"], choices=["demo", "r20-0.1"])
    parser.add_argument("--data", default=f"npz:{DEFAULT_DATA}")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--finetune-steps", type=int, default=50)
    parser.add_argument("--tag", default="", help="suffix of the result files (e.g. before/after a change)")
    args = parser.parse_args()
    folder = RESULTS / "trial_time"
    folder.mkdir(parents=True, exist_ok=True)
    for name, (fields, base_cpu_s) in settings(args).items():
        out = {**measure(f"{name}{args.tag}", fields, args), "base_cpu_s": base_cpu_s}
        (folder / f"{name}{args.tag}.json").write_text(json.dumps(out, indent=1))
        print(name, json.dumps({k: round(v, 2) for k, v in out["phase_s"].items()}),
              f"train+eval share {out['train_and_eval_share']:.2f} (with bn {out['with_bn_share']:.2f}); "
              f"search {out['search_wall_s']:.0f} s, Tune window {out['tune_window_s']:.0f} s, "
              f"slots used {out['slot_use']:.2f}", flush=True)


if __name__ == "__main__":
    main()
