"""What a new user meets first, through the real command line: a fast start, honest exit statuses, interrupts that
keep what finished, quiet output, a resume that compares settings and extends a search, and the Optuna study."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from tests.test_e2e_cli import CLI, ROOT, base_ckpt, cli, rows  # noqa: F401 (base_ckpt: a fixture used here)
from tests.test_results import META, row
from widthsearch.results import ResultsStore

HEAVY = ("torch", "ray", "optuna", "searchers.base")
NOISE = ("A new study created", "Token authentication", "Started a local Ray", "Wrote the latest version",
         "== Status ==", "Trial status", "Tuner.restore", "Resume experiment with", "INFO", "WARNING", "Traceback",
         "tensorboard")


def loaded_after(*args: str) -> tuple[list[str], str]:
    """The heavy modules a fresh interpreter holds after running `widthsearch ARGS` in-process, and its output."""
    code = ("import sys\nfrom widthsearch.app.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
            f"    pass\nprint('LOADED', *sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=True)
    head, _, loaded = proc.stdout.rpartition("LOADED")
    return loaded.split(), head + proc.stderr


@pytest.fixture
def stored(tmp_path) -> Path:
    store = ResultsStore.create(str(tmp_path / "exp"), {**META, "config": {"searcher": "optuna", "budget": 0.5}})
    for r in [row("a", 0.2, 0.5, widths=[1, 4], keep_ratios=[0.25, 0.5]),
              row("b", 0.4, 0.7, widths=[2, 4], keep_ratios=[0.5, 0.5])]:
        store.write_row(r)
    return tmp_path


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["results", "exp"],
                                  ["results", "exp", "--pareto", "--max", "flops=0.5", "--format", "json"],
                                  ["report", "exp", "--out", "REPORT"]])
def test_help_version_results_and_report_load_neither_torch_nor_ray(stored, args):
    args = [str(stored / "report") if a == "REPORT" else a for a in args]
    if args[0] in ("results", "report"):
        args += ["--storage", str(stored)]
    loaded, out = loaded_after(*args)
    assert loaded == [], f"widthsearch {' '.join(args)} imported {loaded}"
    assert {"--help": "usage: widthsearch", "--version": "widthsearch 0."}.get(args[0], "") in out
    if args == ["results", "exp", "--storage", str(stored)]:
        assert "conv1=2 conv2=4" in out  # the widths by group name


def test_search_help_lists_every_option_without_ray(stored):
    loaded, out = loaded_after("search", "--help")
    assert "ray" not in loaded and "optuna" not in loaded and "searchers.base" not in loaded
    assert "--num-samples" in out and "metapruning:" in out and "train_steps=2000" in out  # searchers' options too


def test_an_unwritable_storage_is_refused_before_any_data_is_read_or_model_trained(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = cli("search", "--name", "x", "--storage", str(blocker / "runs"), "--base-epochs", "50", ok=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"error: cannot write to the storage {blocker / 'runs'}: ") and \
        len(proc.stderr.splitlines()) == 1, proc.stderr  # one line, no traceback
    assert "training a base" not in proc.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    debug = cli("search", "--name", "x", "--storage", str(blocker / "runs"), "--debug", ok=False)
    assert debug.returncode == 2 and "Traceback" in debug.stderr  # --debug shows where it came from


def test_a_search_whose_every_trial_fails_exits_1_with_the_reason(tmp_path):
    proc = cli("search", "--name", "bad", "--storage", str(tmp_path), "--model", "tests.fixtures.faulty_model:make",
               "--searcher", "random", "--num-samples", "2", "--finetune-steps", "2", "--bn-batches", "2",
               "--base-epochs", "1", "--concurrency", "1", ok=False, env={"WIDTHSEARCH_TEST_FAULT_WIDTH": "pruned"})
    assert proc.returncode == 1, proc.stderr
    assert re.search(r"^error: 2 trials \(0 ok, 2 failed\) in .*/bad: no trial scored a profile; the first error: "
                     r"RuntimeError: injected fault at width \d+ \(widths \[", proc.stderr, flags=re.M), proc.stderr
    assert "next:" not in proc.stdout and "Traceback" not in proc.stderr
    assert [r["status"] for r in rows(tmp_path / "bad")] == ["error", "error"]


def test_a_search_with_nothing_within_the_budget_exits_1_and_says_so(base_ckpt, tmp_path):  # noqa: F811
    # aofp prunes toward the budget itself; 4 trials (one round and the final trial) cannot reach 0.2
    proc = cli("search", "--name", "far", "--storage", str(tmp_path), "--checkpoint", str(base_ckpt), "--searcher",
               "aofp", "--budget", "0.2", "--num-samples", "4", "--option", "window=2", "--finetune-steps", "2",
               "--bn-batches", "2", "--quiet", ok=False)
    assert proc.returncode == 1, proc.stderr
    assert re.search(r"^error: 4 trials \(2 ok\) in .*/far: no successful trial within the budget 0.2 \(flops\)",
                     proc.stderr, flags=re.M), proc.stderr
    assert "next:" not in proc.stdout and "Traceback" not in proc.stderr


def interrupted(args: list[str], tmp_path: Path, name: str, sig: int, after_rows: int) -> subprocess.CompletedProcess:
    """Run `widthsearch ARGS` (its own process group), send `sig` to it once `after_rows` rows exist, wait for it."""
    out = tmp_path / f"{name}-{int(sig)}.out"
    with open(out, "w") as sink:
        driver = subprocess.Popen(CLI + args, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        try:
            folder = tmp_path / name / "widthsearch" / "rows"
            deadline = time.monotonic() + 900  # generous: a busy machine starts trials late
            while driver.poll() is None and len(list(folder.glob("*.parquet"))) < after_rows:
                assert time.monotonic() < deadline, "no trial finished in time"
                time.sleep(0.3)
            driver.send_signal(sig)
            driver.wait(timeout=600)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)  # only this test's own driver and its local Ray
                driver.wait()
    return subprocess.CompletedProcess(driver.args, driver.returncode, out.read_text(), "")


def test_an_interrupted_search_exits_130_keeps_what_finished_and_resumes(base_ckpt, tmp_path):  # noqa: F811
    """Ctrl-C (SIGINT) to the driver during the trials, then SIGTERM to the resumed one: each exits 130 with one
    line naming the trials kept and our resume command; nothing else is lost, and a last resume finishes."""
    common = ["--name", "intr", "--storage", str(tmp_path)]
    args = ["search", *common, "--checkpoint", str(base_ckpt), "--searcher", "random", "--num-samples", "6",
            "--finetune-steps", "40", "--bn-batches", "5", "--concurrency", "1"]
    first = interrupted(args, tmp_path, "intr", signal.SIGINT, after_rows=1)
    kept = {p.name: p.read_bytes() for p in (tmp_path / "intr" / "widthsearch" / "rows").glob("*.parquet")}
    assert first.returncode == 130, first.stdout
    assert 1 <= len(kept) < 6 and all(r["status"] == "ok" for r in rows(tmp_path / "intr"))
    resume = f"resume with: widthsearch search --resume --name intr --storage {tmp_path}"
    assert f"interrupted: {len(kept)} of 6 trials finished, kept in {tmp_path / 'intr'}; {resume}" in first.stdout
    for text in ("next:", *NOISE):
        assert text not in first.stdout, text

    second = interrupted(["search", "--resume", *common], tmp_path, "intr", signal.SIGTERM, after_rows=len(kept) + 1)
    assert second.returncode == 130 and resume in second.stdout and "next:" not in second.stdout, second.stdout
    last = cli("search", "--resume", *common, "--quiet")
    table = rows(tmp_path / "intr")
    assert last.stdout.startswith(f"6 trials (6 ok) in {tmp_path / 'intr'}\n") and len({r["trial_id"] for r in table}) == 6
    folder = tmp_path / "intr" / "widthsearch"
    assert all((folder / "rows" / n).read_bytes() == data or (folder / "orphaned_rows" / n).is_file()
               for n, data in kept.items())  # the rows kept at the first interrupt are still the same rows


SUMMARY = [r"3 trials \(3 ok\) in {exp}", r"best profiles within the budget \(flops ratio <= 0.5\), longest fine-tune "
           r"first:", r"trial_id +searcher +status +flops_ratio +params +val_acc +score +steps_reached +wall_s +widths",
           *[r"[0-9a-f]{8} +optuna +ok +0\.\d{4} .* features\.0=\d+ features\.3=\d+ features\.7=\d+"] * 3, "",
           r"best: trial [0-9a-f]{8} \(score [\d.]+ after 5 fine-tune steps, flops ratio 0\.\d{4}\)",
           r"next: widthsearch retrain demo --storage {storage} --best --epochs 30"]


def test_a_quiet_demo_search_prints_its_summary_only_and_resumes_only_as_allowed(tmp_path):
    """The demo (optuna on digits, tiny sizes) with --quiet: its stdout and stderr hold our summary lines and nothing
    else. A resume that changes what defines the search is refused, naming each setting; a larger --num-samples
    runs only the missing trials (a second part, its searcher continued); optuna.load_study opens the study."""
    exp = tmp_path / "demo"
    out = cli("search", "--name", "demo", "--storage", str(tmp_path), "--num-samples", "3", "--finetune-steps", "5",
              "--bn-batches", "3", "--base-epochs", "1", "--quiet")
    lines = (out.stdout + out.stderr).splitlines()
    patterns = [p.replace("{exp}", re.escape(str(exp))).replace("{storage}", re.escape(str(tmp_path))) for p in SUMMARY]
    assert len(lines) == len(patterns) and all(re.fullmatch(p, line) for p, line in zip(patterns, lines)), \
        "\n".join(lines)

    resume = ["search", "--resume", "--name", "demo", "--storage", str(tmp_path), "--quiet"]
    refused = cli(*resume, "--budget", "0.3", "--criterion", "taylor", ok=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "error: --resume cannot change budget (stored 0.5, given 0.3), criterion (stored 'l1', given 'taylor'); " \
           "these define the search" in refused.stderr
    lower = cli(*resume, "--num-samples", "2", ok=False)
    assert lower.returncode == 2 and "cannot lower num_samples (stored 3, given 2)" in lower.stderr
    before = {p.name: p.read_bytes() for p in (exp / "widthsearch" / "rows").glob("*.parquet")}

    more = cli(*resume, "--num-samples", "5", "--concurrency", "1")
    table = rows(exp)
    assert more.stdout.startswith(f"5 trials (5 ok) in {exp}\n") and len(table) == 5
    assert {p.name: p.read_bytes() for p in (exp / "widthsearch" / "rows").glob("*.parquet")
            if p.name in before} == before  # the first trials untouched
    assert sorted(r["run"] for r in table) == ["search"] * 3 + ["search-2"] * 2
    assert len([d for d in (exp / "search-2").iterdir() if d.is_dir()]) == 2  # Tune ran the two new trials only
    meta = json.loads((exp / "widthsearch" / "experiment.json").read_text())
    assert (meta["config"]["num_samples"], meta["config"]["concurrency"]) == (5, 1)
    assert meta["resumed"][-1]["changed"] == {"num_samples": [3, 5], "concurrency": [2, 1]}

    path = exp / "widthsearch" / "optuna" / "study.journal"
    study = optuna.load_study(study_name="demo", storage=JournalStorage(JournalFileBackend(str(path))))
    assert {tuple(r["widths"]) for r in table} <= {tuple(t.user_attrs["widths"]) for t in study.trials}
    assert study.best_value == max(r["score"] for r in table)
