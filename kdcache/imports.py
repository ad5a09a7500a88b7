"""Import a user's own `module:callable` (a dataset, transform or model), as `python -m` would, and
the optional frameworks an integration needs.

Every name of user code comes through `user_callable`, only ever from the user's own command line
or config (stores and checkpoints may name registry entries only; see models.py and data.py).
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

from kdcache.errors import KDCacheError, closest


def require(module: str, extra: str, what: str):
    """Import an optional framework `module` for `what`, or stop with one line naming the extra that
    installs it (`pip install 'kdcache[EXTRA]'`)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise KDCacheError(f"{what} needs {module.split('.')[0]}, which is not installed ({e}); "
                           f"pip install 'kdcache[{extra}]'") from None


def user_callable(spec: str, what: str) -> Callable:
    """The callable `spec` = "module:attr[.attr]" names; `what` ("dataset", "model", ...) for errors.

    The current directory is searched first, as `python -m` and `python script.py` do, so a
    `mymod.py` beside the user's command works without PYTHONPATH.
    """
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise KDCacheError(f"{what} '{spec}' is not of the form module:callable (e.g. mypkg.nets:make_net)")
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise KDCacheError(f"cannot load {what} '{spec}': cannot import module '{module_name}' ({e}); run kdcache "
                           "from the folder that holds it, or add that folder to PYTHONPATH") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            raise KDCacheError(f"'{module_name}' has no attribute '{attr_path}' for {what} '{spec}'; "
                               f"did you mean {closest(part, public)}?")
        obj = getattr(obj, part)
    if not callable(obj):
        raise KDCacheError(f"{what} '{spec}' names a {type(obj).__name__}, not a callable")
    return obj
