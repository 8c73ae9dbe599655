"""The registry of pluggable parts: lookup by name or alias, one-line errors, unique names."""

from __future__ import annotations

import pytest

from lm4lv_core.errors import ConfigError
from lm4lv_core.registry import Registry


def test_registry_lookup_order_aliases_and_errors():
    reg: Registry[int] = Registry("widget", hint="see --list", normalize=str.lower)
    reg.register("zeta")(1)
    reg.register("alpha", aliases=("a",))(2)
    assert list(reg) == ["zeta", "alpha"] and len(reg) == 2 and reg.values() == [1, 2]
    assert reg.get("ALPHA") == 2 and reg.get("A") == 2 and "alpha" in reg and "a" not in reg
    with pytest.raises(ConfigError, match=r"^unknown widget 'Beta'; valid: zeta, alpha, or a package.module:Class of your own "
                       r"\(see --list\)$"):
        reg.get("Beta")
    for name, aliases in (("zeta", ()), ("b", ("a",))):  # a name or alias can be taken once only
        with pytest.raises(ValueError, match="already registered"):
            reg.register(name, aliases)(3)
    assert list(reg) == ["zeta", "alpha"]
