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
                 normalize: Callable[[str], str] | None = None) -> None:
        self.kind = kind
        self.hint = hint
        self.normalize = normalize
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
        key = self.normalize(name) if self.normalize else name
        key = self._aliases.get(key, key)
        try:
            return self._items[key]
        except KeyError:
            hint = f" ({self.hint})" if self.hint else ""
            raise ConfigError(f"unknown {self.kind} {name!r}; valid: {', '.join(self._items)}{hint}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is a registered name (aliases and ``normalize`` not applied)."""
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)

    def values(self) -> list[T]:
        return list(self._items.values())


ENCODERS: Registry[Callable] = Registry("vision encoder")
DECODERS: Registry[Callable] = Registry("vision decoder")
ADAPTERS: Registry[Callable] = Registry("adapter")
VISION_LOSSES: Registry[Callable] = Registry("vision loss")
