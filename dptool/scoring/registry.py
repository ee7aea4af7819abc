"""The scoring-method registry: a private dict, a decorator and `list_methods()`; the CLI reads its choices here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["MethodSpec", "register_method", "list_methods", "get_method"]


@dataclass(frozen=True)
class MethodSpec:
    """A scoring method: its function ``fn(ctx) -> MethodResult`` and what it needs from the user.

    `needs_target`: reads target images; `needs_surrogate`: runs a model; `needs_logits`: uses the model's
    class outputs, which must then be one per source class; `reads`: the `ScoreOptions` fields the method uses
    besides the inference options. `help` is one line for ``dptool score -h``.
    """

    name: str
    fn: Callable
    help: str
    needs_target: bool = True
    needs_surrogate: bool = True
    needs_logits: bool = False
    reads: tuple[str, ...] = ()


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, *, help: str, needs_target: bool = True, needs_surrogate: bool = True,
                    needs_logits: bool = False, reads: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn(ctx) -> MethodResult`` as scoring method `name`; duplicate names raise."""

    def deco(fn: Callable) -> Callable:
        if name in _METHODS:
            raise ValueError(f"scoring method {name!r} is already registered")
        _METHODS[name] = MethodSpec(name=name, fn=fn, help=help, needs_target=needs_target,
                                    needs_surrogate=needs_surrogate, needs_logits=needs_logits, reads=tuple(reads))
        return fn

    return deco


def list_methods() -> list[str]:
    """Registered scoring-method names, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    """The `MethodSpec` registered as `name`; an unknown name lists the valid ones (InputError)."""
    from ..errors import InputError

    if name not in _METHODS:
        raise InputError(f"Unknown scoring method {name!r}; choose one of: {', '.join(list_methods())}.")
    return _METHODS[name]
