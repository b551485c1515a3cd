"""builder/record.py: a @record class behaves as the @dataclass it replaces, made without
compiling code (the fully cached build's import time)."""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import field

import pytest

from builder.record import record


@record
class Point:
    """A frozen record with a default and a default factory."""
    x: int
    y: int = 0
    tags: list = field(default_factory=list)
    note: str = field(default="", compare=False, repr=False)


@record
class Point3(Point):
    """Inherits the fields above, adds one."""
    z: int = 0


@record(frozen=False)
class Counter:
    """A mutable record."""
    n: int = 0


@record(eq=False)
class Event:
    """Identity equality, as @dataclass(eq=False)."""
    what: str


def test_init_takes_fields_in_order_by_position_or_name_with_defaults():
    p = Point(1)
    assert (p.x, p.y, p.tags, p.note) == (1, 0, [], "")
    assert Point(1, 2, ["a"]).tags == ["a"] and Point(y=5, x=1).y == 5
    assert Point(1).tags is not Point(1).tags          # a factory per object
    q = Point3(1, 2, [], "n", 3)
    assert (q.x, q.y, q.z, q.note) == (1, 2, 3, "n")
    with pytest.raises(TypeError, match="missing argument 'x'"):
        Point()
    with pytest.raises(TypeError, match="takes 4 arguments"):
        Point(1, 2, [], "", 5)
    with pytest.raises(TypeError, match="'w'"):
        Point(1, w=2)
    with pytest.raises(TypeError, match="'x'"):
        Point(1, x=2)                                  # given twice


def test_frozen_equal_by_value_hashable_and_shown_like_a_dataclass():
    p = Point(1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.x = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        del p.y
    assert p == Point(1, 2, note="ignored") and p != Point(1, 3) and p != Point3(1, 2)
    assert hash(Point(1, 2, (1,))) == hash(Point(1, 2, (1,), "other"))
    assert len({Point(1, 2, ()), Point(1, 2, ())}) == 1
    assert repr(Point(1, 2)) == "Point(x=1, y=2, tags=[])"          # (note: repr=False)
    assert repr(Point3(1)) == "Point3(x=1, y=0, tags=[], z=0)"


def test_mutable_and_identity_records():
    c = Counter()
    c.n += 1
    assert c == Counter(1) and Counter.__hash__ is None
    a, b = Event("x"), Event("x")
    assert a != b and a == a and len({a, b}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.what = "y"


def test_dataclass_functions_match_and_pickle_work():
    p = Point3(1, 2, ["t"], "n", 3)
    assert [f.name for f in dataclasses.fields(p)] == ["x", "y", "tags", "note", "z"]
    assert dataclasses.replace(p, z=9) == Point3(1, 2, ["t"], "n", 9)
    assert dataclasses.asdict(p) == {"x": 1, "y": 2, "tags": ["t"], "note": "n", "z": 3}
    assert dataclasses.is_dataclass(p)
    match p:
        case Point3(1, 2, _, _, z):
            assert z == 3
        case _:
            pytest.fail("no match")
    assert pickle.loads(pickle.dumps(p)) == p
    assert pickle.loads(pickle.dumps(Counter(4))).n == 4


def test_help_shows_the_fields_as_for_a_dataclass():
    import inspect

    @dataclasses.dataclass(frozen=True)
    class Same:
        """The dataclass the record stands for."""
        x: int
        y: int = 0
        tags: list = field(default_factory=list)
        note: str = field(default="", compare=False, repr=False)
    assert str(inspect.signature(Point)) == str(inspect.signature(Same))


def test_what_a_record_cannot_be_is_said_when_the_class_is_made():
    with pytest.raises(TypeError, match="only plain fields"):
        @record
        class KwOnly:
            """kw_only fields are not supported."""
            a: int = field(kw_only=True)
    with pytest.raises(TypeError, match="__post_init__"):
        @record
        class Post:
            """Nor __post_init__."""
            a: int

            def __post_init__(self):
                pass


def test_making_a_record_compiles_nothing(monkeypatch):
    """What it is for: dataclasses compile each generated method with exec()."""
    import builtins
    compiled = []
    real_exec = builtins.exec
    monkeypatch.setattr(builtins, "exec", lambda *a, **k: (compiled.append(a), real_exec(*a, **k)))

    @record
    class Made:
        """Fields only."""
        a: int
        b: str = ""
    assert compiled == [] and Made(1) == Made(1, "")


def test_a_class_own_eq_and_hash_are_kept_as_dataclasses_keep_them():
    @record
    class OwnEq:
        """Its own __eq__; hashed by its fields all the same (frozen)."""
        a: int

        def __eq__(self, other):
            return isinstance(other, OwnEq) and self.a % 10 == other.a % 10

    @dataclasses.dataclass(frozen=True)
    class OwnEqDataclass:
        """The same as a dataclass."""
        a: int

        def __eq__(self, other):
            return isinstance(other, OwnEqDataclass) and self.a % 10 == other.a % 10
    assert OwnEq(1) == OwnEq(11) and OwnEqDataclass(1) == OwnEqDataclass(11)
    assert hash(OwnEq(1)) == hash((1,)) and hash(OwnEqDataclass(1)) == hash((1,))

    @record
    class OwnHash:
        """Its own __hash__."""
        a: int

        def __hash__(self):
            return 7
    assert hash(OwnHash(1)) == 7
