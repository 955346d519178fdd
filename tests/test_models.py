"""The window lifecycle table, the error tree, and the frozen values."""

from __future__ import annotations

import inspect
import itertools

import pytest

from backfill import errors
from backfill.errors import IllegalTransitionError
from backfill.models import (
    TRANSITIONS,
    Window,
    WindowState,
    advance,
    iso,
)

S = WindowState
LEGAL = [(a, b) for a, targets in TRANSITIONS.items() for b in targets]
ILLEGAL = [(a, b) for a, b in itertools.product(S, S) if b not in TRANSITIONS[a]]


def test_every_state_has_a_row() -> None:
    assert set(TRANSITIONS) == set(S)


@pytest.mark.parametrize(("current", "target"), LEGAL)
def test_every_legal_edge_advances(current: WindowState, target: WindowState) -> None:
    assert advance(current, target) is target


@pytest.mark.parametrize(("current", "target"), ILLEGAL)
def test_every_illegal_edge_raises(current: WindowState, target: WindowState) -> None:
    with pytest.raises(IllegalTransitionError, match=f"{current} → {target}"):
        advance(current, target)


def test_the_design_edges_are_exactly_these() -> None:
    # A few that matter most, spelled out against DESIGN.md.
    assert S.SPLIT not in TRANSITIONS[S.READY], "a window with results is never split"
    assert not TRANSITIONS[S.SPLIT], "a split parent is retired for good"
    assert TRANSITIONS[S.COMMITTED] == {S.PENDING}
    assert S.COMMITTED in TRANSITIONS[S.STAGED] and S.COMMITTED not in TRANSITIONS[S.DOWNLOADED]
    assert len(ILLEGAL) > 30


def test_window_is_half_open_and_refuses_empty() -> None:
    w = Window(app="a", start=0, end=86_400_000)
    assert w.length == 86_400_000
    assert w.label == "1970-01-01T00:00:00Z/1970-01-02T00:00:00Z"
    with pytest.raises(ValueError, match="empty window"):
        Window(app="a", start=5, end=5)
    assert iso(1) == "1970-01-01T00:00:00.001Z"


def test_every_error_derives_from_the_root_and_the_docstring_names_it() -> None:
    classes = [
        c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__
    ]
    classes = [c for c in classes if issubclass(c, Exception)]
    assert len(classes) >= 20
    for cls in classes:
        assert issubclass(cls, errors.BackfillError), cls
        assert cls.__name__ in (errors.__doc__ or ""), f"{cls.__name__} missing from the tree"
        assert cls.__doc__, cls


def test_window_errors_carry_their_context() -> None:
    exc = errors.ServerError("boom", retry_after_s=3, app="a", window="w", request_id="26")
    assert str(exc) == "boom (app=a window=w request=26)"
    assert exc.retry_after_s == 3
