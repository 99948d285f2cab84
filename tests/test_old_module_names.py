"""
Modules that moved keep their old names as re-exports: code written for
``connect_native.authorize_intentions`` and ``connect_native.intentions``
gets the same objects as from their new homes.
"""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("connect_native.authorize_intentions", "connect_native.authorize.intentions"),
        ("connect_native.intentions", "connect_native.authorize.rules"),
    ],
)
def test_an_old_name_gives_the_same_objects(old: str, new: str) -> None:
    old_module = importlib.import_module(old)
    new_module = importlib.import_module(new)
    assert old_module.__all__ == new_module.__all__
    for name in old_module.__all__:
        assert getattr(old_module, name) is getattr(new_module, name), name


def test_the_old_intentions_module_keeps_its_names_outside_all() -> None:
    from connect_native.authorize.rules import WILDCARD, HeadersLike
    from connect_native.intentions import WILDCARD as old_wildcard
    from connect_native.intentions import HeadersLike as old_headers

    assert (old_wildcard, old_headers) == (WILDCARD, HeadersLike)
