"""The command line's shape: version, the exit-code table, --json wherever a result is printed, lazy wings."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

import pytest

import nnrouter
from nnrouter.cli import build_parser


def nnrouter_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nnrouter", *args], check=False, capture_output=True, text=True, timeout=120
    )


def leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every runnable command, by its words (``("study", "show")``)."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(leaves(sub, (*path, name)))
    if not out and path:
        out[path] = parser
    return out


# Commands that print no result of their own: long-running stages, the YAML
# example (it is the output), and benchmarks that print tables as they go.
NO_JSON = {
    ("serve",),
    ("route",),
    ("forward",),
    ("web",),
    ("config", "example"),
    ("bench", "ingest"),
    ("bench", "console"),
    ("bench", "infer"),
    ("bench", "route"),
    ("bench", "soak"),
}


def test_version_is_the_package_version():
    res = nnrouter_run("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"nnrouter {nnrouter.__version__}"


def test_help_says_what_each_exit_code_means():
    res = nnrouter_run("--help")
    assert res.returncode == 0
    table = res.stdout[res.stdout.index("exit codes:") :]
    for code, word in ((0, "ok"), (1, "failed"), (2, "usage"), (3, "configuration or schema")):
        assert f"  {code}  {word}" in table


def test_every_command_that_prints_a_result_takes_json():
    commands = leaves(build_parser())
    assert set(commands) >= NO_JSON  # the exceptions are real commands
    missing = [
        " ".join(words)
        for words, p in commands.items()
        if words not in NO_JSON and "--json" not in p._option_string_actions
    ]
    assert not missing, f"no --json: {missing}"


def test_nouns_group_their_verbs():
    commands = set(leaves(build_parser()))
    assert {
        ("study", "show"),
        ("study", "hang"),
        ("study", "report"),
        ("protocols", "write"),
        ("protocols", "send"),
        ("forward",),
    } <= commands


@pytest.mark.parametrize(
    "args",
    [
        ["study"],  # a noun without its verb
        ["protocols", "send", "pacs"],  # --rules missing
        ["hang-protocols", "--out", "x", "--send", "pacs"],  # the old name's own check
        ["status", "--no-such-option"],
    ],
)
def test_usage_errors_exit_2(args, tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "nnrouter", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert res.returncode == 2, res.stderr
    assert not (tmp_path / "x").exists()  # nothing was written before the refusal


def test_the_cli_does_not_import_training_or_testing(tmp_path):
    """A node without the [train] extra runs every service command: those wings load only inside their commands."""
    cfg = tmp_path / "nnrouter.yaml"
    cfg.write_text(
        f"database: {{url: 'sqlite:///{tmp_path / 'db.sqlite'}'}}\n"
        f"storage: {{path: '{tmp_path / 'spool'}', min_free_mb: 1}}\n"
        "models: {classifier: null, detector: null}\n"
    )
    code = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from nnrouter.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["db", "upgrade", "--config", {str(cfg)!r}]) == 0
            assert main(["status", "--json", "--config", {str(cfg)!r}]) == 0
            assert main(["outbox", "list", "--json", "--config", {str(cfg)!r}]) == 0
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("nnrouter", "torch"))))
    """)
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    loaded = json.loads(res.stdout)
    assert "nnrouter.service.status" in loaded  # the command did run
    assert not [m for m in loaded if m.startswith(("nnrouter.training", "nnrouter.testing", "torch"))]
