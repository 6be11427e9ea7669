"""The user's own code: import it by dotted path, call it with the arguments it takes, and find what
installed packages offer through entry points. Every failure is a ConfigError that names the module,
the error and what to check, so a typo in a path is one paragraph, not a traceback.

Decisions:
- The directory cnnlab is started from is importable, as it is for `python -m cnnlab` (Python puts it
  first on sys.path), also for the `cnnlab` console script and for worker processes. `python -m cnnlab`
  and `cnnlab` put it into $PYTHONPATH (`export_cwd`), which launchers' worker processes inherit.
- Objects given from Python (a notebook's class or instance, `cnnlab.train(model=MyNet)`) are
  `provide`d under the dotted path their run records; `locate` finds them before trying an import, so
  a class defined in `__main__` trains, and its run records where it came from.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from cnnlab.checks import ConfigError

log = logging.getLogger("cnnlab")

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_PROVIDED: dict[str, Any] = {}  # dotted path -> object handed over from Python (see provide)
_ENTRY_POINTS_LOADED: set[str] = set()
ENTRY_POINT_FAILURES: dict[str, str] = {}  # "group:name" -> why it did not load (named when it is asked for)


def export_cwd() -> None:
    """Make the working directory importable here and in every process started from here."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if cwd not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([cwd, *paths])


def check_dotted(key: str, path: Any, example: str) -> str:
    """A `module.attribute` path, checked for form only (nothing is imported)."""
    if not isinstance(path, str) or not _DOTTED.match(path):
        raise ConfigError(f"{key}={path!r} must be a dotted path module.Name of a class or function, "
                          f"e.g. {key}={example} for class {example.rsplit('.', 1)[1]} in {example.rsplit('.', 1)[0]}.py "
                          f"in the directory you run cnnlab from, or in an installed package")
    return path


def dotted_name(obj: Any) -> str:
    """Where an object says it lives: module.QualName (a notebook's: __main__.Name)."""
    cls = obj if inspect.isclass(obj) or inspect.isfunction(obj) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}".replace(".<locals>.", ".")


@contextmanager
def provide(path: str, obj: Any) -> Iterator[None]:
    """While inside, `locate(path)` returns `obj` without importing anything."""
    _PROVIDED[path] = obj
    try:
        yield
    finally:
        _PROVIDED.pop(path, None)


def import_module(name: str, key: str) -> Any:
    """Import a module of the user's; ConfigError naming what failed and what to check."""
    export_cwd()
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and name.startswith(err.name) and (err.name == name or name.startswith(err.name + ".")):
            raise ConfigError(f"{key}: no module named {err.name!r}. Check that {err.name.replace('.', '/')}.py is in "
                              f"the directory you run cnnlab from ({os.getcwd()}), or that the package is installed "
                              f"in this Python ({sys.executable})") from None
        raise ConfigError(f"{key}: importing {name} failed: {err}; install the package it needs") from None
    except ConfigError as err:
        raise ConfigError(f"{key}: importing {name} failed: {err}") from None
    except Exception as err:  # noqa: BLE001 - the user's module: any error is theirs to fix, one line
        raise ConfigError(f"{key}: importing {name} raised {error_text(err)}; fix the module and run again") from None


def locate(path: str, key: str) -> Any:
    """The object at a dotted path: provided from Python, else imported (module, then attributes)."""
    if path in _PROVIDED:
        return _PROVIDED[path]
    if path.startswith("__main__."):
        raise ConfigError(f"{key}={path}: the class was defined in a notebook or script (__main__), which this process "
                          f"cannot import. From Python, hand it over again (cnnlab.train(..., model=Class), "
                          f"cnnlab.load_run(dir).model(Class)), or move it into a .py file and name that module")
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest importable prefix is the module
        module_name = ".".join(parts[:cut])
        if cut > 1 and not _exists(module_name):
            continue
        obj = import_module(module_name, key)
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                names = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None)))
                raise ConfigError(f"{key}={path}: {module_name} has no {attr!r}; what it defines: "
                                  f"{', '.join(names) or 'nothing callable'}")
            obj = getattr(obj, attr)
        return obj
    raise AssertionError("unreachable: cut == 1 always imports")


def _exists(module_name: str) -> bool:
    export_cwd()
    try:
        return importlib.util.find_spec(module_name) is not None
    except Exception:  # noqa: BLE001 - a parent that is no package, or fails to import (reported by the import)
        return False


def call(factory: Callable[..., Any], path: str, key: str, given: dict[str, Any], offered: dict[str, Any]) -> Any:
    """factory(**given, **the offered values it names): `given` are the user's, each must be accepted;
    `offered` (sizes from the dataset) go only where a parameter of that name exists."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: pass what the user gave
        signature = None
    if signature is not None:
        params = signature.parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [k for k in given if k not in params and not takes_any]
        if unknown:
            raise ConfigError(f"{key}: {path} takes no argument {', '.join(map(repr, unknown))}; its arguments: "
                              f"{describe(signature)}")
        given = {**{k: v for k, v in offered.items() if k in named and k not in given}, **given}
        missing = [n for n, p in params.items() if p.default is p.empty and n not in given
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if missing:
            raise ConfigError(f"{key}: {path} needs {', '.join(map(repr, missing))}, which nothing gives; add "
                              f"{' '.join(f'+{key}.{m}=...' for m in missing)} (its arguments: {describe(signature)})")
    try:
        return factory(**given)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's constructor
        args = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise ConfigError(f"{key}: {path}({args}) raised {error_text(err)}; check the arguments against its signature"
                          f"{' (' + describe(signature) + ')' if signature else ''}") from None


def describe(signature: inspect.Signature) -> str:
    return ", ".join(str(p) for p in signature.parameters.values()) or "none"


def error_text(err: BaseException) -> str:
    """`TypeError: message (file.py, line N)`: the user's frame nearest the error."""
    frames = [f for f in inspect.getinnerframes(err.__traceback__)] if err.__traceback__ else []
    theirs = [f for f in frames if "/cnnlab/" not in f.filename.replace(os.sep, "/") and "site-packages" not in f.filename]
    place = f" ({os.path.basename(theirs[-1].filename)}, line {theirs[-1].lineno})" if theirs else ""
    message = str(err).splitlines()[0] if str(err) else ""
    if isinstance(err, SyntaxError):  # its message names the file and line already
        place = ""
    return f"{type(err).__name__}{': ' + message if message else ''}{place}"


def load_entry_points(group: str) -> list[tuple[str, Any]]:
    """(name, loaded object) of each entry point in `group`, once per process. One that fails to load
    is skipped with a warning (an installed package must not stop every run) and named if asked for."""
    if group in _ENTRY_POINTS_LOADED:
        return []
    _ENTRY_POINTS_LOADED.add(group)
    loaded = []
    for ep in importlib.metadata.entry_points(group=group):
        try:
            loaded.append((ep.name, ep.load()))
        except Exception as err:  # noqa: BLE001 - a broken plugin
            ENTRY_POINT_FAILURES[f"{group}:{ep.name}"] = f"entry point {ep.name} = {ep.value} failed to load: {error_text(err)}"
            log.warning("%s", ENTRY_POINT_FAILURES[f"{group}:{ep.name}"])
    return loaded
