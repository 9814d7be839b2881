"""Where a task's dataset and model come from, in the driver and in every Ray worker.

A space file's ``task:`` names the dataset and the model in one of three ways:

* a built-in name (``digits``, ``digits_cnn``, ``torchvision:resnet18``, ...);
* ``module:attribute`` (``my_pkg.data:load_cells``, ``my_pkg.nets:Net``): sctune imports ``module`` and
  uses ``attribute`` as the dataset loader (``fn(task) -> x_train, y_train, x_test, y_test, num_classes,
  augment``) or the model builder (``fn(num_classes, input_shape, dropout) -> nn.Module``; a class works);
* a name registered with ``register_dataset`` / ``register_model``, by a module listed in
  ``task.modules`` (imported first, in the driver and in every worker) or by the driver itself.

The driver resolves all of it before Ray starts (``check_task``): a name that does not resolve is a
``ConfigError`` on ``task.dataset`` / ``task.model`` / ``task.modules[i]``. Registrations the driver made
itself travel to the workers with every trial (``registrations`` -> ``install``, pickled with cloudpickle:
functions defined in a driver script go by value); the user's modules reach the workers through the
driver's working directory (local runs), ``ray job submit --working-dir``, or Ray's runtime environment
(``py_modules``, see ``py_modules_to_ship``) when sctune connects to a cluster itself.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Any

from .config import ConfigError, TaskConfig

_MODULE = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_REFERENCE_RE = re.compile(rf"^({_MODULE}):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")
RESERVED_PREFIXES = ("torchvision:",)  # model names with a colon that are not module references


def is_reference(name: str) -> bool:
    """``module:attribute`` (and not one of sctune's own prefixed names like ``torchvision:resnet18``)."""
    return not name.startswith(RESERVED_PREFIXES) and bool(_REFERENCE_RE.match(name))


def _import(module: str, key: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(key, f"cannot import {module}: {e}") from None
    except Exception as e:  # the user's module raised while importing: say so, in one line
        raise ConfigError(key, f"cannot import {module}: {type(e).__name__}: {e}") from None


def import_modules(task: TaskConfig) -> None:
    """Import ``task.modules`` (their ``register_*`` calls run); idempotent."""
    for i, module in enumerate(task.modules):
        _import(module, f"task.modules[{i}]")


def resolve_reference(ref: str, key: str) -> Any:
    """The callable a ``module:attribute`` reference names; ConfigError on ``key`` if there is none."""
    m = _REFERENCE_RE.match(ref)
    if not m or ref.startswith(RESERVED_PREFIXES):
        raise ConfigError(key, f"{ref!r} is not a module:attribute reference")
    module, attr = m.groups()
    obj: Any = _import(module, key)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(key, f"module {module} ({getattr(sys.modules.get(module), '__file__', '?')}) has no "
                                   f"attribute {attr!r}") from None
    if not callable(obj):
        raise ConfigError(key, f"{ref} is a {type(obj).__name__}, not a function or class")
    return obj


class Registry:
    """Names a space file can use for one kind of thing (datasets, models) -> the function behind each.

    ``data.py`` and ``models.py`` fill theirs at import with sctune's built-ins; users add their own with
    ``register_dataset`` / ``register_model``. A name that is not registered may still be ``module:<attr>``.
    """

    def __init__(self, noun: str, *, attr: str, key: str, builtins: str, extra_names: tuple[str, ...] = ()):
        self.noun, self.attr, self.key, self.extra_names = noun, attr, key, extra_names
        self.builtins = builtins  # the module that registers sctune's own names, loaded on first use
        self.entries: dict[str, Any] = {}

    def _load_builtins(self) -> None:
        # by name, not an import statement: data.py and models.py import this module, not the reverse
        importlib.import_module(self.builtins)

    def register(self, name: str, fn: Any = None, *, overwrite: bool = False):
        """Register ``fn`` under ``name``; usable as a decorator."""

        def deco(f: Any) -> Any:
            if name in self.entries and not overwrite:
                raise ValueError(f"{self.noun} {name!r} is already registered (pass overwrite=True to replace it)")
            self.entries[name] = f
            return f

        return deco(fn) if fn is not None else deco

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self.entries) + list(self.extra_names)

    def lookup(self, name: str) -> Any:
        """What ``name`` stands for: a registration, or ``module:<attr>`` imported here; else a ConfigError
        at this registry's key listing the known names."""
        self._load_builtins()
        if name in self.entries:
            return self.entries[name]
        if is_reference(name):
            return resolve_reference(name, self.key)
        raise ConfigError(self.key, f"unknown {self.noun} {name!r} (known: {', '.join(self.names())}; or "
                                    f"module:{self.attr}, or register it in a module listed under task.modules)")

    def user_entry(self, name: str) -> Any | None:
        """The function registered under ``name`` if a user (not sctune) registered it."""
        fn = self.entries.get(name)
        return fn if fn is not None and not _is_ours(fn) else None


DATASETS = Registry("dataset", attr="function", key="task.dataset", builtins="sctune.core.data")
MODELS = Registry("model", attr="builder", key="task.model", builtins="sctune.core.models",
                  extra_names=("torchvision:<name>",))


def check_task(task: TaskConfig) -> None:
    """Everything the task names resolves in this process (imports ``task.modules`` first)."""
    import_modules(task)
    DATASETS.lookup(task.dataset)
    if not task.model.startswith(RESERVED_PREFIXES):
        MODELS.lookup(task.model)


# -- driver-side registrations ------------------------------------------------------------------

def _is_ours(fn: Any) -> bool:
    return (getattr(fn, "__module__", None) or "").split(".")[0] == "sctune"


def registrations(task: TaskConfig) -> dict[str, dict[str, Any]]:
    """The registered dataset/model functions this task names that sctune does not provide itself: what
    the workers must register too. Sent with every trial (``install``)."""
    out: dict[str, dict[str, Any]] = {"datasets": {}, "models": {}}
    for kind, registry, name in (("datasets", DATASETS, task.dataset), ("models", MODELS, task.model)):
        fn = registry.user_entry(name)
        if fn is not None:
            out[kind][name] = fn
    return out


def check_shippable(task: TaskConfig, regs: dict[str, dict[str, Any]]) -> None:
    """Registrations that cannot be pickled fail here, in the driver, not in every trial."""
    import ray.cloudpickle as cloudpickle

    for kind, key in (("datasets", "task.dataset"), ("models", "task.model")):
        for name, fn in regs[kind].items():
            try:
                cloudpickle.dumps(fn)
            except Exception as e:
                raise ConfigError(key, f"{name!r} is registered in this process but cannot be sent to Ray's "
                                       f"workers ({type(e).__name__}: {e}); define it in a module and name it "
                                       "as module:function or under task.modules") from None


def install(task: TaskConfig, regs: dict[str, dict[str, Any]] | None) -> None:
    """In a worker: import ``task.modules`` and register what the driver registered."""
    import_modules(task)
    for name, fn in (regs or {}).get("datasets", {}).items():
        DATASETS.register(name, fn, overwrite=True)
    for name, fn in (regs or {}).get("models", {}).items():
        MODELS.register(name, fn, overwrite=True)


def check_in_worker(task: TaskConfig, regs: dict[str, dict[str, Any]] | None) -> str:
    """Run as a Ray task before any trial: the task resolves in a worker too. Returns the worker's node id."""
    import ray

    install(task, regs)
    check_task(task)
    return ray.get_runtime_context().get_node_id()


# -- shipping the user's modules ------------------------------------------------------------------

def _module_names(task: TaskConfig, regs: dict[str, dict[str, Any]]) -> list[str]:
    names = list(task.modules)
    for ref in (task.dataset, task.model):
        if is_reference(ref):
            names.append(ref.split(":", 1)[0])
    for fns in regs.values():
        for fn in fns.values():
            mod = getattr(fn, "__module__", None)
            if mod and mod != "__main__":
                names.append(mod)
    return names


def _installed_roots() -> set[Path]:
    roots = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            roots.add(Path(p).resolve())
    return roots


def _root_of(module: ModuleType) -> tuple[Path, Path] | None:
    """(the sys.path folder the module was found in, the file or package folder to ship), or None."""
    path = getattr(module, "__path__", None)
    if path is not None:
        paths = list(path)
        if len(paths) != 1:
            return None
        target = Path(paths[0]).resolve()
    elif getattr(module, "__file__", None):
        target = Path(module.__file__).resolve()
    else:
        return None
    return target.parent, target


def py_modules_to_ship(task: TaskConfig, regs: dict[str, dict[str, Any]], *, local: bool,
                       job_working_dir: bool) -> list[str]:
    """Top-level packages/modules of the user's code that Ray's workers could not import by themselves,
    for ``runtime_env={"py_modules": [...]}``.

    Installed packages and sctune are never shipped. Workers of a local Ray already see the driver's
    working directory, its script's folder and ``PYTHONPATH``; a ``ray job submit --working-dir`` job
    already ships its working directory (the job's cwd) to every node. Anything else the driver imported
    (a folder it put on ``sys.path``, code next to a driver on the head of a multi-node cluster) is shipped.
    """
    installed = _installed_roots()
    seen_by_workers: set[Path] = set()
    cwd = Path.cwd().resolve()
    if local:
        seen_by_workers |= {cwd, Path(sys.argv[0]).resolve().parent if sys.argv and sys.argv[0] else cwd}
        seen_by_workers |= {Path(p).resolve() for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    elif job_working_dir:
        seen_by_workers.add(cwd)
    out: list[str] = []
    for name in _module_names(task, regs):
        top = name.split(".")[0]
        if top == "sctune" or top not in sys.modules:
            continue
        where = _root_of(sys.modules[top])
        if where is None:
            continue
        root, target = where
        if any(root == r or r in root.parents for r in installed) or root in seen_by_workers:
            continue
        if str(target) not in out:
            out.append(str(target))
    return out
