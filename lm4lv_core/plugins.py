"""Plugins: a user's own module registers parts (vision encoders, decoders, adapters, vision
losses, degradations, metrics) in lm4lv's registries, and every command, worker, node and later
command on its run uses them.

Where plugins come from, in this order:

* installed packages' entry points in the group ``lm4lv.plugins`` (loaded automatically; an entry
  point naming a callable is called once after its module is imported);
* ``LM4LV_PLUGINS``: module names or ``.py`` files, separated by ``os.pathsep`` or commas;
* ``--plugin MODULE_OR_FILE`` on any command (repeatable).

A target ``package.module:Class`` names a part directly wherever a registered name is taken
(``--encoder my_vision:PatchEncoder:SOURCE``, a vision config's ``name:``), as the reference's
``target:`` does; the module is imported on first use.

A run records what it loaded (:func:`records`: module names, a file's path and sha256) in its
model config; reading that config again imports them (:func:`restore`), and a plugin that is
missing, or a file changed since the run, is one error line naming it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError

ENV = "LM4LV_PLUGINS"
ENTRY_POINT_GROUP = "lm4lv.plugins"
_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

_loaded: dict[str, dict[str, Any]] = {}  # key (module name or file path) → its record
_env_done = False


def sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _is_file(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or Path(spec).is_file()


def load(spec: str, *, origin: str = "--plugin") -> dict[str, Any]:
    """Import the plugin ``spec`` (a module name or a ``.py`` file) once; returns its record."""
    spec = spec.strip()
    if not spec:
        raise ConfigError(f"{origin}: empty plugin name")
    if _is_file(spec):
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"{origin} {spec}: plugin file not found")
        key = str(path)
        if key not in _loaded:
            _loaded[key] = {"file": key, "module": _import_file(path, origin), "sha256": sha256(path)}
        return _loaded[key]
    if spec not in _loaded:
        _import_module(spec, origin)
        _loaded[spec] = {"module": spec}
    return _loaded[spec]


def _import_module(name: str, origin: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise ConfigError(f"{origin} {name}: no module named {e.name!r} (install it, or give its .py file "
                              "or put its folder on PYTHONPATH)") from None
        raise ConfigError(f"{origin} {name}: importing it failed: {e}") from None
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a plugin's own failure is one line naming it
        raise ConfigError(f"{origin} {name}: importing it failed: {type(e).__name__}: {e}") from None


def _import_file(path: Path, origin: str) -> str:
    """Import a ``.py`` file as a module named after it (so ``stem:Class`` targets find it)."""
    name = path.stem
    have = sys.modules.get(name)
    if have is not None:
        if Path(getattr(have, "__file__", "") or "").resolve() == path:
            return name
        raise ConfigError(f"{origin} {path}: a module named {name!r} is already imported from "
                          f"{getattr(have, '__file__', None) or 'elsewhere'}; rename the file")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        del sys.modules[name]
        raise
    except Exception as e:  # noqa: BLE001
        del sys.modules[name]
        raise ConfigError(f"{origin} {path}: importing it failed: {type(e).__name__}: {e}") from None
    return name


def load_environment() -> None:
    """Entry points of installed packages and ``LM4LV_PLUGINS`` (once per process)."""
    global _env_done
    if _env_done:
        return
    _env_done = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        origin = f"entry point {ep.name} ({ep.value})"
        module = ep.value.partition(":")[0].strip()
        _import_module(module, origin)
        if ":" in ep.value:
            obj = ep.load()
            if callable(obj):
                obj()
        _loaded.setdefault(module, {"module": module})
    for spec in re.split(rf"[{re.escape(os.pathsep)},]", os.environ.get(ENV, "")):
        if spec.strip():
            load(spec, origin=ENV)


def load_all(specs: list[str]) -> None:
    """The environment's plugins, then ``specs`` (``--plugin``); exported in ``LM4LV_PLUGINS`` so
    that the processes this one starts (launchers, workers, data loaders) load them too."""
    load_environment()
    for spec in specs:
        load(spec)
    files_and_modules = [r.get("file") or r["module"] for r in _loaded.values()]
    if files_and_modules:
        os.environ[ENV] = ",".join(files_and_modules)


def records() -> list[dict[str, Any]]:
    """What this process loaded, for a run to record."""
    return [dict(r) for r in _loaded.values()]


def merge_records(recorded: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The plugins a config records: those it recorded before (a resumed run, a saved model) and
    those loaded in this process."""
    out = {r.get("file") or r["module"]: r for r in recorded or []}
    out.update({r.get("file") or r["module"]: dict(r) for r in _loaded.values()})
    return list(out.values())


def restore(recorded: list[dict[str, Any]] | None, where: str = "the run") -> None:
    """Import the plugins ``recorded`` by a run again; a missing one, or a file whose content
    changed since, is one error line naming it."""
    for rec in recorded or []:
        if not isinstance(rec, dict) or "module" not in rec:
            raise ConfigError(f"{where}: malformed plugin record {rec!r}")
        path = rec.get("file")
        if path is None:
            load(rec["module"], origin=f"plugin recorded by {where}:")
            continue
        if not Path(path).is_file():
            raise ConfigError(f"plugin {path} recorded by {where} is missing; put it back (sha256 {rec.get('sha256')})")
        now = sha256(path)
        if rec.get("sha256") and now != rec["sha256"]:
            raise ConfigError(f"plugin {path} changed since {where} used it: recorded sha256 {rec['sha256']}, "
                              f"now {now}; restore that file, or start a new run")
        load(path, origin=f"plugin recorded by {where}:")


def is_target(name: str) -> bool:
    """Whether ``name`` has the form ``package.module:Class``."""
    return bool(_TARGET.match(name))


def resolve_target(name: str) -> Any:
    """The object a ``package.module:Class`` target names (module imported on first use); the
    error says what is missing, for the caller to prefix."""
    module_name, _, attr = name.partition(":")
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise ConfigError(f"no module named {e.name!r} (give its file with --plugin FILE.py, install it, or "
                              "put its folder on PYTHONPATH)") from None
        except Exception as e:  # noqa: BLE001 - the module's own failure, in one line
            raise ConfigError(f"importing {module_name} failed: {type(e).__name__}: {e}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module {module_name} has no {attr!r}") from None


def split_target(text: str, known) -> tuple[str, str]:
    """``FAMILY:SOURCE`` or ``package.module:Class:SOURCE`` → (name, source). ``known(name)``
    says whether a plain name is registered (a registered name wins)."""
    first, _, rest = text.partition(":")
    if known(first.strip()) or not rest:
        return first.strip(), rest.strip()
    attr, _, source = rest.partition(":")
    if is_target(f"{first.strip()}:{attr.strip()}"):
        return f"{first.strip()}:{attr.strip()}", source.strip()
    return first.strip(), rest.strip()
