"""Import-level smoke test; the full suites live beside it."""

import canonreg


def test_public_names() -> None:
    assert canonreg.RELATIONS == ("f-RGA", "f-GWA", "f-RWA", "b-RGA", "b-GWA", "b-RWA")
    assert set(canonreg.RELATION_PAIRS) == set(canonreg.RELATIONS)
