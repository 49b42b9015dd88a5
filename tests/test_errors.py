"""Bad input to the commands: one line naming the flag, the value and the fix; non-zero exit; nothing started."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from conftest import free_port, run_command, start_redis_server, stop_process, wait_for

from assayer import records, workers
from assayer.connection import mask

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
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--redis_url="],
        "watch: error: --redis_url is empty; give a URL such as redis://localhost:6379/0, or leave the flag out to "
        "use $REDIS_URL or --redis_host and --redis_port",
    ),
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
        "watch: error: --evaluator={folder}/not_callable.py:evaluate: evaluate is of type int, not a function; point "
        "--evaluator at a function that takes one checkpoint path, such as def evaluate(checkpoint_path)",
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
        "watch: error: --redis_url=redis://localhost:notaport/0 is invalid: the port must be a number between 1 and "
        "65535, e.g. redis://localhost:6379/0",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--redis_url=redis://:secret@localhost:1/abc"],
        "watch: error: --redis_url=redis://:***@localhost:1/abc is invalid: the database must be a number, e.g. "
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
        "watch: error: --num_eval_workers=five: expected a whole number such as 5",
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
    (
        ["--directory=ckpt", "--evaluator=good.py:"],
        "watch: error: --evaluator={folder}/good.py: has no function name after the colon; use "
        "{folder}/good.py:FUNCTION",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--redis_url=redis://[::1"],
        "watch: error: --redis_url=redis://[::1 is invalid: the host must be a host name, an IPv4 address or an IPv6 "
        "address in brackets, e.g. redis://[::1]:6379/0",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--redis_url=redis://:secret@[zz]:6379/0"],
        "watch: error: --redis_url=redis://:***@[zz]:6379/0 is invalid: the host must be a host name, an IPv4 address "
        "or an IPv6 address in brackets, e.g. redis://[::1]:6379/0",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--redis_url=redis://"],
        "watch: error: --redis_url=redis:// is invalid: the host is missing; put one after redis://, e.g. "
        "redis://localhost:6379/0",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--redis_url=rediss://:secret@:6380/0"],
        "watch: error: --redis_url=rediss://:***@:6380/0 is invalid: the host is missing; put one after rediss://, "
        "e.g. rediss://localhost:6379/0",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--redis_url=unix://"],
        "watch: error: --redis_url=unix:// is invalid: the socket path is missing; put an absolute path after "
        "unix://, e.g. unix:///tmp/redis.sock",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--redis_url=unix://relative.sock", "--nolaunch_redis"],
        "watch: error: --redis_url=unix://relative.sock is invalid: the socket path relative.sock is relative; put "
        "an absolute path after unix://, e.g. unix://{folder}/relative.sock",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--redis_url=redis://127.0.0.1:99999/0"],
        "watch: error: --redis_url=redis://127.0.0.1:99999/0 is invalid: the port must be a number between 1 and "
        "65535, e.g. redis://localhost:6379/0",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--redis_url=redis://127.0.0.1:0/0"],
        "watch: error: --redis_url=redis://127.0.0.1:0/0 is invalid: the port must be a number between 1 and "
        "65535, e.g. redis://localhost:6379/0",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--redis_url=redis://localhost:6379/0?timeout=5"],
        "watch: error: --redis_url=redis://localhost:6379/0?timeout=5 is invalid: redis-py rejected its query "
        "options (AbstractConnection.__init__() got an unexpected keyword argument 'timeout'); correct or remove them",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--redis_url=redis://localhost:6379/0?db=one"],
        "watch: error: --redis_url=redis://localhost:6379/0?db=one is invalid: redis-py rejected its query options "
        "(Invalid value for 'db' in connection URL.); correct or remove them",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--polling_interval=abc"],
        "watch: error: --polling_interval=abc: expected a number of seconds such as 5",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--num_eval_workers=many"],
        "watch: error: --num_eval_workers=many: expected a whole number such as 5",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--eval_timeout=1.5"],
        "watch: error: --eval_timeout=1.5: expected a whole number of seconds such as 1",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--eval_existing=maybe"],
        "watch: error: --eval_existing=maybe: expected true or false, or the flag alone: --eval_existing or "
        "--noeval_existing",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--noeval_existing=1"],
        "watch: error: --noeval_existing=1: --noeval_existing takes no value; write --noeval_existing, or "
        "--eval_existing=true or false",
    ),
    (
        ["--directory=ckpt", "--evaluator=good.py:evaluate", "--num_eval_workers"],
        "watch: error: --num_eval_workers needs a value: expected a whole number such as 5",
    ),
]


@pytest.mark.parametrize("args, expected", CASES, ids=[" ".join(args) for args, _ in CASES])
def test_watch_rejects_bad_input(settings, connection, folder, state_home, args, expected):
    result = watch(settings, folder, *args)
    assert result.returncode == 1
    assert result.stderr.strip() == expected.format(folder=folder)
    assert "Traceback" not in result.stderr
    assert "secret" not in result.stdout + result.stderr
    assert connection.smembers(records.WATCHES_KEY) == set()
    assert workers.running_pools(connection) == {}
    assert not (state_home / "assayer").exists()


STATUS_CASES = [
    (
        ["--interval=0.01"],
        "status: error: --interval=0.01: expected a number of seconds of at least 0.1, such as 5",
    ),
    (["--format=xml"], "status: error: --format=xml: expected one of table, json, csv"),
    (
        ["--follow=maybe"],
        "status: error: --follow=maybe: expected true or false, or the flag alone: --follow or --nofollow",
    ),
]


@pytest.mark.parametrize("args, expected", STATUS_CASES, ids=[" ".join(args) for args, _ in STATUS_CASES])
def test_status_rejects_bad_flags(settings, folder, args, expected):
    result = run_command("assayer.status", f"--redis_url={settings.url}", *args, cwd=folder)
    assert result.returncode == 1
    assert result.stderr.strip() == expected
    assert "Traceback" not in result.stderr


def test_shutdown_rejects_bad_timeout(settings, folder):
    result = run_command("assayer.shutdown", f"--redis_url={settings.url}", "--timeout=soon", cwd=folder)
    assert result.returncode == 1
    assert result.stderr.strip() == "shutdown: error: --timeout=soon: expected a number of seconds such as 60"


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
        f"watch: error: cannot reach Redis at redis://:***@127.0.0.1:{port}/0 (Error 111 connecting to "
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
    assert result.stderr.startswith(f"watch: error: cannot reach Redis at redis://:***@127.0.0.2:{port}/0 (")
    assert "secret" not in result.stdout + result.stderr
    assert not (state_home / "assayer" / "redis").exists()


def test_shutdown_unknown_directory(settings, folder):
    result = run_command("assayer.shutdown", f"--redis_url={settings.url}", "--directory=nowhere", cwd=folder)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"shutdown: error: --directory=nowhere: no watch of {folder}/nowhere on this Redis; watched directories: none"
    )


def launch_watch(folder, redis_url: str, *args: str):
    """Run the watch command with --launch_redis on, as a new user would, against `redis_url`."""
    return run_command(
        "assayer.watch",
        f"--redis_url={redis_url}",
        "--directory=ckpt",
        "--evaluator=good.py:evaluate",
        "--num_eval_workers=0",
        "--num_watch_workers=0",
        *args,
        cwd=folder,
    )


def port_in_use_message(port: int) -> str:
    return (
        f"watch: error: port {port} on 127.0.0.1 is in use by another program that does not respond as a Redis "
        "server; use a free port with --redis_port or --redis_url, or pass --nolaunch_redis so that assayer does "
        "not start a Redis server"
    )


def accepts_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture
def http_port(tmp_path):
    """A loopback port where Python's http.server listens, a program that is not Redis."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: accepts_connections(port), 10, message="http.server to listen")
    yield port
    process.terminate()
    process.wait(10)


def test_launch_on_port_of_http_server(http_port, folder, state_home):
    url = f"redis://127.0.0.1:{http_port}/0"
    result = launch_watch(folder, url)
    assert result.returncode == 1
    assert result.stderr.strip() == port_in_use_message(http_port)
    assert not (state_home / "assayer").exists()

    status = run_command("assayer.status", f"--redis_url={url}", cwd=folder)
    assert status.returncode == 1
    assert status.stderr.startswith(f"status: error: cannot reach Redis at {url} (")


def test_bracketed_redis_host(folder, state_home):
    result = run_command(
        "assayer.watch",
        "--directory=ckpt",
        "--evaluator=good.py:evaluate",
        "--redis_host=[::1]",
        env={"REDIS_URL": ""},
        cwd=folder,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "watch: error: --redis_host=[::1] is invalid: use a host name or IP address without brackets, e.g. "
        "localhost or ::1"
    )
    assert not (state_home / "assayer").exists()


def test_no_launch_on_port_of_http_server(http_port, folder, state_home):
    result = launch_watch(folder, f"redis://127.0.0.1:{http_port}/0", "--nolaunch_redis")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"watch: error: port {http_port} on 127.0.0.1 is in use by another program that does not respond as a "
        "Redis server; point --redis_url or --redis_port at your Redis server"
    )


def test_tls_url_for_plain_redis(settings, folder, state_home):
    port = settings.port
    result = launch_watch(folder, f"rediss://127.0.0.1:{port}/0")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"watch: error: port {port} on 127.0.0.1 accepts connections but does not answer as a Redis server over "
        "TLS, as rediss:// asks; for a Redis server without TLS, use redis://"
    )
    assert not (state_home / "assayer").exists()


def test_database_out_of_range(settings, folder):
    url = settings.url.rsplit("/", 1)[0] + "/99"
    result = run_command("assayer.status", f"--redis_url={url}", cwd=folder)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"status: error: Redis at {url} has no database 99 (DB index is out of range); use a lower number in "
        "--redis_url: a server has 16 databases, 0 to 15, unless its `databases` setting says otherwise"
    )


MASKED_URLS = [
    ("redis://:secret@localhost:6379/0", "redis://:***@localhost:6379/0"),
    ("redis://user:secret@localhost:6379/0", "redis://user:***@localhost:6379/0"),
    ("redis://localhost:6379/0", "redis://localhost:6379/0"),
    ("unix://:secret@/tmp/redis.sock", "unix://:***@/tmp/redis.sock"),
    ("redis://:secret@[zz]:6379/0", "redis://:***@[zz]:6379/0"),
]


@pytest.mark.parametrize("url, masked", MASKED_URLS, ids=[masked for _, masked in MASKED_URLS])
def test_mask_keeps_url_shape(url, masked):
    assert mask(url) == masked


def test_launch_on_port_bound_elsewhere(folder, state_home):
    # A socket that is bound but not listening refuses connections, so only redis-server's own bind finds it taken.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        result = launch_watch(folder, f"redis://127.0.0.1:{port}/0")
    assert result.returncode == 1
    assert result.stderr.strip() == port_in_use_message(port)
    assert not (state_home / "assayer").exists()


def test_launch_on_unix_path_of_file(folder, state_home):
    notes = folder / "notes.txt"
    notes.write_text("keep me")
    result = launch_watch(folder, f"unix://{notes}")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"watch: error: no Redis server is listening at unix://{notes}, and {notes} is a file, not a socket, which "
        "redis-server would delete; use another socket path in --redis_url"
    )
    assert notes.read_text() == "keep me"
    assert not (state_home / "assayer").exists()


def test_launch_in_missing_socket_folder(folder, state_home):
    path = folder / "missing" / "redis.sock"
    result = launch_watch(folder, f"unix://{path}")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"watch: error: no Redis server is listening at unix://{path}, and redis-server cannot create its socket "
        f"there: folder {folder}/missing does not exist; create it or use another socket path in --redis_url"
    )
    assert not (state_home / "assayer").exists()


def test_launch_on_socket_of_other_program(folder, state_home):
    path = folder / "other.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        # The listener accepts connections into its backlog and never replies, so PING times out.
        listener.bind(str(path))
        listener.listen()
        result = launch_watch(folder, f"unix://{path}")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"watch: error: socket {path} is in use by another program that does not respond as a Redis server; use "
        "another socket path in --redis_url, or pass --nolaunch_redis so that assayer does not start a Redis server"
    )
    assert path.exists()
    assert not (state_home / "assayer").exists()


@pytest.fixture
def password_port(tmp_path):
    """The loopback port of a redis-server that requires the password `secret`."""
    process, settings = start_redis_server(tmp_path, "--requirepass", "secret", password="secret")
    yield settings.port
    stop_process(process)


PROGRAM_ARGS = {
    "status": [],
    "watch": ["--directory=ckpt", "--evaluator=good.py:evaluate", "--num_eval_workers=0", "--num_watch_workers=0"],
}


@pytest.mark.parametrize("program", PROGRAM_ARGS)
def test_password_required_but_missing(password_port, folder, state_home, program):
    url = f"redis://127.0.0.1:{password_port}/0"
    result = run_command(f"assayer.{program}", f"--redis_url={url}", *PROGRAM_ARGS[program], cwd=folder)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"{program}: error: Redis at {url} requires a password, and none was given; put it in --redis_url or "
        f"$REDIS_URL, e.g. redis://:PASSWORD@127.0.0.1:{password_port}/0"
    )
    assert not (state_home / "assayer").exists()
