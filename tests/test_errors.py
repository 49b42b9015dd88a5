"""Bad input to the commands: one line naming the flag, the value and the fix; non-zero exit; nothing started."""

from __future__ import annotations

import pytest
from conftest import free_port, run_command

from assayer import records, workers

EVALUATORS = {
    "good.py": "def evaluate(path):\n    return 1.0\n",
    "two_arguments.py": "def evaluate(path, device):\n    return 1.0\n",
    "no_arguments.py": "def evaluate():\n    return 1.0\n",
    "broken_import.py": "import module_that_does_not_exist\n\ndef evaluate(path):\n    return 1.0\n",
    "syntax_error.py": "def evaluate(path)\n    return 1.0\n",
    "not_callable.py": "evaluate = 3\n",
}


@pytest.fixture
def folder(tmp_path):
    for name, source in EVALUATORS.items():
        (tmp_path / name).write_text(source)
    (tmp_path / "a_file.pt").write_text("not a folder")
    return tmp_path


def watch(settings, folder, *args):
    return run_command(
        "assayer.watch",
        f"--redis_url={settings.url}",
        "--num_eval_workers=0",
        "--num_watch_workers=0",
        *args,
        cwd=folder,
    )


CASES = [
    (
        ["--directory=ckpt", "--evaluator=missing.py:evaluate"],
        "watch: error: --evaluator={folder}/missing.py:evaluate: file {folder}/missing.py not found",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:nope"],
        "watch: error: --evaluator={folder}/good.py:nope: good has no attribute 'nope'; check the function name",
    ),
    (
        ["--directory=ckpt", "--evaluator=broken_import.py:evaluate"],
        "watch: error: --evaluator={folder}/broken_import.py:evaluate: importing {folder}/broken_import.py failed: "
        "ModuleNotFoundError: No module named 'module_that_does_not_exist'",
    ),
    (
        ["--directory=ckpt", "--evaluator=syntax_error.py:evaluate"],
        "watch: error: --evaluator={folder}/syntax_error.py:evaluate: importing {folder}/syntax_error.py failed: "
        "SyntaxError: expected ':' (syntax_error.py, line 1)",
    ),
    (
        ["--directory=ckpt", "--evaluator=two_arguments.py:evaluate"],
        "watch: error: --evaluator={folder}/two_arguments.py:evaluate: evaluate(path, device) cannot be called "
        "with one checkpoint path (missing a required argument: 'device'); define it as def evaluate(checkpoint_path)",
    ),
    (
        ["--directory=ckpt", "--evaluator=no_arguments.py:evaluate"],
        "watch: error: --evaluator={folder}/no_arguments.py:evaluate: evaluate() cannot be called with one "
        "checkpoint path (too many positional arguments); define it as def evaluate(checkpoint_path)",
    ),
    (
        ["--directory=ckpt", "--evaluator=not_callable.py:evaluate"],
        "watch: error: --evaluator={folder}/not_callable.py:evaluate: int object is not callable",
    ),
    (
        ["--directory=ckpt", "--evaluator=nomodule.evals.score"],
        "watch: error: --evaluator=nomodule.evals.score: module nomodule not found; run from the folder that "
        "contains it, install it, or use path/to/file.py:function",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py"],
        "watch: error: --evaluator=good.py names a file but no function; use good.py:FUNCTION",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--regex_filter="],
        "watch: error: --regex_filter is empty, so every file and folder would be a checkpoint; pass a pattern",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--polling_interval=inf"],
        "watch: error: --polling_interval=inf is invalid: use a number of seconds greater than 0",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--redis_url=redis://localhost:notaport/0"],
        "watch: error: --redis_url=redis://localhost:notaport/0 is invalid: the port must be a number, e.g. "
        "redis://localhost:6379/0",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--redis_url=redis://:secret@localhost:1/abc"],
        "watch: error: --redis_url=redis://***@localhost:1/abc is invalid: the database must be a number, e.g. "
        "redis://localhost:6379/0",
    ),
    (
        ["--directory=ckpt", "--evaluator=score"],
        "watch: error: --evaluator=score is invalid: use path/to/file.py:function or package.module.function",
    ),
    (["--evaluator=good.py:evaluate"], "watch: error: --directory is required (see --helpshort)"),
    (["--directory=ckpt"], "watch: error: --evaluator is required (see --helpshort)"),
    (
        ["--directory=a_file.pt", "--evaluator=good.py:evaluate"],
        "watch: error: --directory={folder}/a_file.pt is a file; pass the folder that contains the checkpoints",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--regex_filter=(.pt"],
        "watch: error: --regex_filter=(.pt is not a valid regular expression: missing ), unterminated subpattern "
        "at position 0",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--polling_interval=0"],
        "watch: error: --polling_interval=0.0 is invalid: use a number of seconds greater than 0",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--max_retries=-1"],
        "watch: error: --max_retries=-1 is invalid: use 0 or more",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--num_eval_workers=-2"],
        "watch: error: --num_eval_workers=-2 is invalid: use 0 or more",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--settle_seconds=-1"],
        "watch: error: --settle_seconds=-1.0 is invalid: use 0 or more",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--ready_marker=a/b"],
        "watch: error: --ready_marker=a/b is invalid: use a file name such as commit_success.txt",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--eval_queue_name=watch"],
        "watch: error: --watch_queue_name=watch and --eval_queue_name=watch must be two different, non-empty names",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--num_eval_workers=five"],
        "watch: error: flag --num_eval_workers=five: invalid literal for int() with base 10: 'five' (see --helpshort)",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--redis_url=http://localhost:6379"],
        "watch: error: --redis_url=http://localhost:6379 is invalid: the scheme must be redis://, rediss:// or "
        "unix://, e.g. redis://localhost:6379/0",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "extra"],
        "watch: error: unexpected argument 'extra'; every option is a --flag (see --helpshort)",
    ),
]


@pytest.mark.parametrize("args, expected", CASES, ids=[" ".join(args) for args, _ in CASES])
def test_watch_rejects_bad_input(settings, connection, folder, args, expected):
    result = watch(settings, folder, *args)
    assert result.returncode == 1
    assert result.stderr.strip() == expected.format(folder=folder)
    assert "Traceback" not in result.stderr
    assert connection.smembers(records.WATCHES_KEY) == set()
    assert workers.running_pools(connection) == {}


def test_unreachable_redis_without_launch(folder, state_home):
    port = free_port()
    result = run_command(
        "assayer.watch",
        f"--redis_url=redis://:secret@127.0.0.1:{port}/0",
        "--nolaunch_redis",
        "--directory=ckpt",
        "--evaluator=good.py:evaluate",
        cwd=folder,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"watch: error: cannot reach Redis at redis://***@127.0.0.1:{port}/0 (Error 111 connecting to "
        f"127.0.0.1:{port}. Connection refused.); start a Redis server there or point --redis_url at one, or "
        "leave --launch_redis on so that assayer starts one"
    )
    assert "secret" not in result.stdout + result.stderr


def test_other_host_is_never_launched(folder, state_home):
    # 127.0.0.2 stands for another machine: only localhost, 127.0.0.1, ::1 and unix sockets count as local.
    port = free_port()
    result = run_command(
        "assayer.watch",
        f"--redis_url=redis://:secret@127.0.0.2:{port}/0",
        "--directory=ckpt",
        "--evaluator=good.py:evaluate",
        cwd=folder,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"watch: error: cannot reach Redis at redis://***@127.0.0.2:{port}/0 (")
    assert "secret" not in result.stdout + result.stderr
    assert not (state_home / "assayer" / "redis").exists()


def test_shutdown_unknown_directory(settings, folder):
    result = run_command("assayer.shutdown", f"--redis_url={settings.url}", "--directory=nowhere", cwd=folder)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"shutdown: error: --directory=nowhere: no watch of {folder}/nowhere on this Redis; watched directories: none"
    )
