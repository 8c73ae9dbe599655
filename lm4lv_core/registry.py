"""One small registry for pluggable parts (encoders, decoders, adapters, vision losses,
degradations, metrics)."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to entries in registration order. ``@REG.register("name")`` adds one;
    ``REG.get`` looks it up; iterating yields the names.

    ``normalize`` maps a looked-up name to its key (e.g. lower case), ``hint`` ends the
    unknown-name error, and ``aliases`` given at registration are other names of an entry.
    """

    def __init__(self, kind: str, *, hint: str = "",
                 normalize: Callable[[str], str] | None = None,
                 interface: tuple[str, ...] = (), base: str = "") -> None:
        self.kind = kind
        self.hint = hint
        self.normalize = normalize
        self.interface = interface  # attributes an entry must have (checked for ``module:Class`` targets)
        self.base = base            # what to subclass to get them, named in the error
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            for key in (name, *aliases):
                if key in self._items or key in self._aliases:
                    raise ValueError(f"{self.kind} {key!r} is already registered")
            self._items[name] = obj
            self._aliases.update(dict.fromkeys(aliases, name))
            return obj

        return deco

    def get(self, name: str) -> T:
        """The entry of ``name`` (or of an alias); an unknown name raises a one-line
        ``ConfigError`` listing the valid names."""
        from . import plugins

        key = self.normalize(name) if self.normalize else name
        key = self._aliases.get(key, key)
        if key in self._items:
            return self._items[key]
        hint = f" ({self.hint})" if self.hint else ""
        if not plugins.is_target(name):
            raise ConfigError(f"unknown {self.kind} {name!r}; valid: {', '.join(self._items)}, or a "
                              f"package.module:Class of your own{hint}")
        try:
            entry = plugins.resolve_target(name)
        except ConfigError as e:
            raise ConfigError(f"{self.kind} {name}: {e} (registered {self.kind}s: {', '.join(self._items)})") from None
        self.check(entry, name)
        return entry

    def check(self, entry: object, name: str) -> None:
        """One-line error when ``entry`` lacks an attribute of this registry's interface."""
        missing = [a for a in self.interface if not hasattr(entry, a)]
        if missing:
            base = f" (subclass {self.base})" if self.base else ""
            raise ConfigError(f"{self.kind} {name} does not answer the {self.kind} interface: missing "
                              f"{', '.join(missing)}{base}")

    def knows(self, name: str) -> bool:
        """Whether ``name`` is a registered name or alias (``normalize`` applied)."""
        key = self.normalize(name) if self.normalize else name
        return key in self._items or key in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is a registered name (aliases and ``normalize`` not applied)."""
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)

    def values(self) -> list[T]:
        return list(self._items.values())


# the vision parts' interface (lm4lv_core.vision.base): what a user's class must answer
_PART = ("source_kwargs", "token_space", "meta", "plan_shape", "forward")
ENCODERS: Registry[Callable] = Registry("vision encoder", interface=_PART,
                                        base="lm4lv_core.vision.VisionEncoder")
DECODERS: Registry[Callable] = Registry("vision decoder", interface=_PART + ("differentiable",),
                                        base="lm4lv_core.vision.VisionDecoder")
ADAPTERS: Registry[Callable] = Registry("adapter")
VISION_LOSSES: Registry[Callable] = Registry("vision loss", interface=("tokens", "uses_decoder", "__call__"),
                                             base="lm4lv_core.vision.VisionLoss")
