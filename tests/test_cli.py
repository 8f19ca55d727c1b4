"""The command line in-process (no Ray): help lines, `results` sorting and SQL, and the README's examples."""

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from tests.test_results import META, row
from widthsearch.app.cli import build_parser, main
from widthsearch.app.config import KEYS, declared
from widthsearch.results import ResultsStore

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def storage(tmp_path) -> Path:
    store = ResultsStore.create(str(tmp_path / "runs" / "exp"), META)
    for r in [row("a", 0.2, 0.5), row("b", 0.4, 0.7), row("c", 0.5, 0.6), row("d", 0.9, 0.95),
              row("e", None, None, status="error", error="ValueError: boom", searcher="grid")]:
        store.write_row(r)
    return tmp_path / "runs"


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_every_search_key_has_a_help_text():
    assert sorted(declared()) == sorted(KEYS)
    assert all(option.help_text().strip() for option in declared().values())


def test_search_help_names_come_from_the_registries():
    from searchers import SEARCHERS
    from widthsearch.importance import CRITERIA
    from widthsearch.models import BUILTIN_MODELS

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(subparsers.choices["search"].format_help().split())
    for names in (SEARCHERS, CRITERIA, BUILTIN_MODELS):
        assert all(name in text for name in names)
    assert "--num-samples NUM_SAMPLES number of trials (for aofp and metapruning: the most trials) (an integer >= 1; " \
           "default 16)" in text  # its help, its check and its default, from its one declaration


def test_every_flag_has_a_help_line():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {"widthsearch": parser, **subparsers.choices}
    assert set(subparsers.choices) == {"search", "results", "retrain", "report", "train-base"}
    for name, p in parsers.items():
        for action in p._actions:
            what = f"{name} {'/'.join(action.option_strings) or action.dest}"
            text = re.sub(r"\(default[^)]*\)", "", action.help or "").strip()
            assert text, f"{what} has no help line"
        p.format_help()  # every help string formats (no stray %)
    for action in subparsers._choices_actions:
        assert action.help, f"command {action.dest} has no help line"


def test_sort_takes_a_leading_dash(storage, capsys):
    for sort, expected in [("-score", ["d", "b", "c", "a", "e"]), ("score", ["a", "c", "b", "d", "e"]),
                           ("-flops_ratio", ["d", "c", "b", "a", "e"])]:
        code, out, _ = run(capsys, "results", "exp", "--storage", str(storage), "--sort", sort, "--format", "json")
        assert code == 0 and [r["trial_id"] for r in json.loads(out)] == expected, sort
    code, out, _ = run(capsys, "results", "exp", "--storage", str(storage), "--sort=-score", "--limit", "1",
                       "--format", "json")
    assert [r["trial_id"] for r in json.loads(out)] == ["d"]
    code, _, err = run(capsys, "results", "exp", "--storage", str(storage), "--sort", "-nope")
    assert code == 2 and "unknown column 'nope' in sort '-nope'" in err


SQL = "SELECT searcher, count(*) AS trials, max(score) AS best, sum(flops_ratio > 0.3) AS big FROM results " \
      "GROUP BY searcher ORDER BY searcher"


def test_sql_through_the_cli(storage, capsys):
    code, out, _ = run(capsys, "results", "exp", "--storage", str(storage), "--sql", SQL, "--format", "json")
    assert code == 0 and json.loads(out) == [{"searcher": "grid", "trials": 1, "best": None, "big": None},
                                             {"searcher": "random", "trials": 4, "best": 0.95, "big": 3}]
    uri = (storage).as_uri()  # URI storage: read through pyarrow.fs, then registered with DuckDB
    code, out, _ = run(capsys, "results", "exp", "--storage", uri, "--sql", SQL, "--format", "json")
    assert code == 0 and json.loads(out)[1] == {"searcher": "random", "trials": 4, "best": 0.95, "big": 3}
    code, out, _ = run(capsys, "results", "exp", "--storage", str(storage), "--sql",
                       "SELECT trial_id, widths, score * 2 AS double FROM results WHERE score > 0.6 ORDER BY score")
    assert code == 0 and [line.split() for line in out.splitlines()] == [
        ["trial_id", "widths", "double"], ["b", "[2,4]", "1.4000"], ["d", "[2,4]", "1.9000"]]


@pytest.mark.parametrize("args, message", [
    (["--sql", "SELEC trial_id FROM results"], "--sql query failed: Parser Error: syntax error"),
    (["--sql", "SELECT nope FROM results"], "--sql query failed: Binder Error"),
    (["--sql", "CREATE TABLE t AS SELECT 1"], "--sql takes one query that returns rows, such as SELECT ... FROM results; got"),
    (["--sql", "SELECT 1; SELECT 2"], "--sql takes one query"),
    (["--sql", "SELECT 1", "--sort", "-score", "--pareto"], "--sql does not combine with --pareto, --sort"),
])
def test_sql_errors(storage, capsys, args, message):
    code, _, err = run(capsys, "results", "exp", "--storage", str(storage), *args)
    assert code == 2 and message in err


def test_sql_without_duckdb(storage, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "duckdb", None)  # as if it were not installed: import raises ImportError
    code, _, err = run(capsys, "results", "exp", "--storage", str(storage), "--sql", "SELECT 1")
    assert code == 2 and "--sql needs DuckDB: pip install 'widthsearch[sql]'" in err


def readme_commands(program: str) -> list[list[str]]:
    """The `widthsearch PROGRAM ...` lines of the README's bash blocks, split as a shell would."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words[:-1]):
                if word.endswith("widthsearch") and words[i + 1] == program:
                    commands.append(words[i + 1:])
    return commands


def test_readme_results_examples_run(storage, tmp_path, capsys):
    commands = readme_commands("results")
    flags = {word for command in commands for word in command}
    assert len(commands) >= 5 and {"--sql", "--pareto", "--where", "--out", "-score"} <= flags
    for command in commands:
        args = list(command)
        args[1] = "exp"  # the experiment made here, in place of the README's name
        for i, word in enumerate(args[:-1]):
            if word == "--storage":
                args[i + 1] = str(storage)
            elif word == "--out":
                args[i + 1] = str(tmp_path / Path(args[i + 1]).name)
        code, out, err = run(capsys, *args)
        assert code == 0, f"README: widthsearch {shlex.join(command)}\n{err}"
        written = [tmp_path / Path(args[i + 1]).name for i, word in enumerate(args[:-1]) if word == "--out"]
        assert out.strip() or all(path.stat().st_size for path in written), shlex.join(command)
