"""Optional packages (the extras of lm4lv): imported on use, a missing one is one line."""

from __future__ import annotations


def require(module: str, extra: str, family: str):
    """Import ``module`` for ``family``; a missing one is one line naming the extra to install."""
    import importlib

    from ..errors import ConfigError

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"the {family} vision family needs the {module} package: "
                          f"pip install 'lm4lv[{extra}]'") from None
