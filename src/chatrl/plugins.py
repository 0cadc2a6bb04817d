"""User code named in a config: `pkg.module:name` (importable) or `path/to/file.py:name`.

One loader for everything a user plugs in (reward functions, environments), so every spec is written, found
and reported the same way. Errors are `ChatrlError`s naming the spec and the config key to fix.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

from chatrl.errors import ChatrlError


def load_object(spec: str, what: str, config_key: str) -> object:
    """The object `spec` names. `what` ("reward function", "environment") and `config_key` word the errors."""
    if ":" not in spec:
        raise ChatrlError(f"{what} '{spec}': expected 'pkg.module:name' or 'file.py:name' (set {config_key})")
    target, name = spec.rsplit(":", 1)
    try:
        if target.endswith(".py"):
            path = Path(target)
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            if module_spec is None or module_spec.loader is None or not path.is_file():
                raise FileNotFoundError(f"no file {target}")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        obj = getattr(module, name)
    except (ImportError, FileNotFoundError, AttributeError) as e:
        raise ChatrlError(f"{what} '{spec}' cannot be loaded: {e}. Check {config_key}") from None
    except Exception as e:  # the user's module raised while being imported
        raise ChatrlError(f"{what} '{spec}': importing it raised {type(e).__name__}: {e}") from None
    if not callable(obj):
        raise ChatrlError(f"{what} '{spec}' is not callable (got {type(obj).__name__}); check {config_key}")
    return obj


def import_optional(module: str, extra: str, what: str) -> ModuleType:
    """Import an optional dependency (a chatrl extra); missing -> one line saying which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ChatrlError(f"{what} needs the package '{module}' ({e}): pip install 'chatrl[{extra}]'") from None
