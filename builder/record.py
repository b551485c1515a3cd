"""`@record`: a dataclass whose methods are shared, not generated for each class.

Python 3.11's dataclasses write each class's `__init__`, `__setattr__`,
`__delattr__`, `__repr__`, `__eq__` and `__hash__` as source text and
compile it when the class is created: ~0.45 ms a class here, 33 ms of the
75 ms a fully cached build spends in Python before it does anything (54
classes). `record` lets dataclasses collect the fields (so `fields()`,
`replace()`, `asdict()` and `match` work as on any dataclass) and gives the
class methods made once for all: creating it costs ~0.03 ms.

    @record                      # as @dataclass(frozen=True)
    @record(frozen=False)        # as @dataclass
    @record(eq=False)            # identity equality and hash, as @dataclass(eq=False)

The shared `__init__` takes the fields in order, positionally or by name,
with their defaults and default factories (no `__post_init__`, `InitVar`,
`kw_only` or `init=False` fields: none of ours has them; they raise
TypeError when the class is made). It is slower per object than a generated
one (~1 us more): keep `@dataclass` for classes made by the thousand in a
loop, such as the context's entries (context.Entry).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing

_MISSING = dataclasses.MISSING


# (For type checkers: a @record class is a dataclass; its __init__ takes its fields.)
@typing.dataclass_transform(field_specifiers=(dataclasses.field, dataclasses.Field))
def record(cls=None, /, *, frozen: bool = True, eq: bool = True, repr: bool = True):
    def wrap(cls):
        return _make(cls, frozen, eq, repr)
    return wrap if cls is None else wrap(cls)


def _make(cls, frozen: bool, eq: bool, repr: bool):
    # Fields only: with nothing to generate, dataclass() compiles no code.
    cls = dataclasses.dataclass(cls, init=False, repr=False, eq=False, frozen=False)
    fields = dataclasses.fields(cls)
    for f in fields:
        if not f.init or f.kw_only or f._field_type is not dataclasses._FIELD:
            raise TypeError(f"@record {cls.__name__}.{f.name}: only plain fields are supported")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"@record {cls.__name__}: __post_init__ is not supported")
    own = cls.__dict__
    cls.__init__ = _init_of(tuple(f.name for f in fields),
                            {f.name: f.default for f in fields if f.default is not _MISSING},
                            {f.name: f.default_factory for f in fields
                             if f.default_factory is not _MISSING})
    # What help() and inspect.signature() show of it: the fields, as for a dataclass.
    cls.__init__.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + [
            inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              default=f.default if f.default is not _MISSING
                              else inspect.Parameter.empty if f.default_factory is _MISSING
                              else _FACTORY, annotation=f.type)
            for f in fields], return_annotation=None)
    cls.__record_repr__ = tuple(f.name for f in fields if f.repr)
    if repr and "__repr__" not in own:
        cls.__repr__ = _repr
    if eq:
        cls.__record_compare__ = tuple(f.name for f in fields if f.compare)
        if "__eq__" not in own:
            cls.__eq__ = _eq
        # As dataclasses: frozen and compared by value, hashed by value; mutable, unhashable;
        # a __hash__ the class defines is kept (not the None its own __eq__ implies).
        if "__hash__" not in own or (own["__hash__"] is None and "__eq__" in own):
            cls.__hash__ = _hash if frozen else None
    if frozen:
        cls.__setattr__ = _frozen_setattr
        cls.__delattr__ = _frozen_delattr
    return cls


class _Factory:
    """The default shown for a field made by a default factory (as dataclasses show it)."""

    def __repr__(self) -> str:
        return "<factory>"


_FACTORY = _Factory()


def _init_of(names: tuple[str, ...], defaults: dict, factories: dict):
    count = len(names)
    put = object.__setattr__

    def __init__(self, *args, **kwargs):
        if len(args) > count:
            raise TypeError(f"{type(self).__name__}() takes {count} arguments, "
                            f"{len(args)} were given")
        for name, value in zip(names, args):
            put(self, name, value)
        for name in names[len(args):]:
            if name in kwargs:
                put(self, name, kwargs.pop(name))
            elif name in defaults:
                put(self, name, defaults[name])
            elif name in factories:
                put(self, name, factories[name]())
            else:
                raise TypeError(f"{type(self).__name__}() missing argument {name!r}")
        if kwargs:
            raise TypeError(f"{type(self).__name__}() got an unexpected or repeated argument "
                            f"{next(iter(kwargs))!r}")
    return __init__


def _repr(self) -> str:
    args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__record_repr__)
    return f"{type(self).__qualname__}({args})"


def _values(self) -> tuple:
    return tuple(getattr(self, name) for name in self.__record_compare__)


def _eq(self, other):
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self) -> int:
    return hash(_values(self))


def _frozen_setattr(self, name, value):
    raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self, name):
    raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
