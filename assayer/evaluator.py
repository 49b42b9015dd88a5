"""Resolving and checking evaluator references: `path/to/file.py:function` and `package.module.function`."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from assayer.errors import UsageError

Evaluator = Callable[[str], Any]


def normalize(reference: str, working_dir: str) -> str:
    """Return the reference with a file path made absolute, so that workers in any folder can load it."""
    path, separator, function = reference.rpartition(":")
    if not separator or not path.endswith(".py"):
        return reference
    return f"{os.path.abspath(os.path.join(working_dir, os.path.expanduser(path)))}:{function}"


def load(reference: str, search_path: str | None = None) -> Evaluator:
    """Import the evaluator named by `reference` and return it.

    The folder of a `file.py` evaluator is put first on `sys.path`, so the file can import its neighbours
    (`from train import Net`) whatever the working directory of the worker. `search_path`, the working
    directory of the watch command, makes `package.module.function` importable the same way.

    Raises:
        UsageError: the reference is malformed, its file or module is missing, importing it raised,
            or the name is not a function taking one checkpoint path.
    """
    path, separator, function_name = reference.rpartition(":")
    if not separator and reference.endswith(".py"):
        raise UsageError(f"--evaluator={reference} names a file but no function; use {reference}:FUNCTION")
    if separator and path.endswith(".py"):
        if not function_name:
            raise UsageError(f"--evaluator={reference} has no function name after the colon; use {path}:FUNCTION")
        module = _import_file(reference, path)
    else:
        module_name, _, function_name = reference.rpartition(".")
        if not module_name or not function_name or separator:
            raise UsageError(
                f"--evaluator={reference} is invalid: use path/to/file.py:function or package.module.function"
            )
        module = _import_module(reference, module_name, search_path)
    function = getattr(module, function_name, None)
    if function is None:
        raise UsageError(
            f"--evaluator={reference}: {module.__name__} has no attribute {function_name!r}; check the function name"
        )
    check_signature(reference, function_name, function)
    return function


def check_signature(reference: str, name: str, function: Any) -> None:
    """Raise UsageError unless `function`, found as `name`, can be called with a single positional checkpoint path."""
    if not callable(function):
        raise UsageError(
            f"--evaluator={reference}: {name} is of type {type(function).__name__}, not a function; point "
            f"--evaluator at a function that takes one checkpoint path, such as def {name}(checkpoint_path)"
        )
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # Builtins without a signature: trust the caller.
    try:
        signature.bind("checkpoint")
    except TypeError as error:
        raise UsageError(
            f"--evaluator={reference}: {function.__name__}{signature} cannot be called with one checkpoint "
            f"path ({error}); define it as def {function.__name__}(checkpoint_path)"
        ) from None


def _import_file(reference: str, path: str):
    if not os.path.isfile(path):
        raise UsageError(f"--evaluator={reference}: file {path} not found")
    folder = os.path.dirname(os.path.abspath(path))
    _prepend_path(folder)
    name = os.path.splitext(os.path.basename(path))[0]
    existing = sys.modules.get(name)
    if existing is not None and os.path.abspath(getattr(existing, "__file__", "") or "") == os.path.abspath(path):
        return existing
    if existing is not None:
        # Another module has the file's name (a stdlib module, say): load under a name of its own.
        name = f"assayer_evaluator_{abs(hash(os.path.abspath(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as error:
        del sys.modules[name]
        raise UsageError(f"--evaluator={reference}: importing {path} failed: {_describe(error)}") from None
    return module


def _import_module(reference: str, module_name: str, search_path: str | None):
    if search_path:
        _prepend_path(search_path)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise UsageError(
                f"--evaluator={reference}: module {error.name} not found; run from the folder that contains "
                "it, install it, or use path/to/file.py:function"
            ) from None
        raise UsageError(f"--evaluator={reference}: importing {module_name} failed: {_describe(error)}") from None
    except (Exception, SystemExit) as error:
        raise UsageError(f"--evaluator={reference}: importing {module_name} failed: {_describe(error)}") from None


def _prepend_path(folder: str) -> None:
    if folder in sys.path:
        sys.path.remove(folder)
    sys.path.insert(0, folder)


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1]}" if text else type(error).__name__
