"""The bench's pure helpers: percentiles, least-squares slope, event time parsing."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from integration.bench.bench import (
    _order,
    linear_fit,
    parse_event_time_ns,
    parse_rfc3339_ns,
    percentile,
    slope,
    summarize,
)

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


def test_percentile_known_values() -> None:
    xs = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert percentile(xs, 0) == 15.0
    assert percentile(xs, 100) == 50.0
    assert percentile(xs, 50) == 35.0
    assert percentile(xs, 25) == 20.0
    assert percentile(xs, 40) == pytest.approx(29.0)  # 1.6 ranks in: 20 + 0.6 * 15
    assert percentile(list(reversed(xs)), 40) == pytest.approx(29.0)  # order does not matter


def test_percentile_of_1_to_100() -> None:
    xs = [float(i) for i in range(1, 101)]
    assert percentile(xs, 50) == pytest.approx(50.5)
    assert percentile(xs, 95) == pytest.approx(95.05)
    assert percentile(xs, 99) == pytest.approx(99.01)


def test_percentile_single_value_and_errors() -> None:
    assert percentile([7.0], 0) == percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    with pytest.raises(ValueError):
        percentile([1.0], -1)


@given(st.lists(finite, min_size=2, max_size=60))
def test_percentile_matches_statistics_inclusive(xs: list[float]) -> None:
    # statistics.quantiles(n=100, method="inclusive") gives the 1st..99th percentiles
    qs = statistics.quantiles(xs, n=100, method="inclusive")
    for q in (1, 25, 50, 95, 99):
        assert percentile(xs, q) == pytest.approx(qs[q - 1], rel=1e-9, abs=1e-6)


@given(st.lists(finite, min_size=1, max_size=60), st.floats(min_value=0, max_value=100))
def test_percentile_bounded_and_monotonic(xs: list[float], q: float) -> None:
    p = percentile(xs, q)
    assert min(xs) <= p <= max(xs)
    assert percentile(xs, min(100.0, q + 1)) >= p


def test_summarize() -> None:
    s = summarize([3.0, 1.0, 2.0])
    assert s == {"n": 3, "min": 1.0, "mean": 2.0, "p50": 2.0, "p95": 2.9, "p99": 2.98, "max": 3.0}
    assert summarize([]) == {"n": 0}


def test_slope_exact_line() -> None:
    xs = [1.0, 10.0, 50.0, 100.0]
    ys = [24000.0 + 48.5 * x for x in xs]
    m, b = linear_fit(xs, ys)
    assert m == pytest.approx(48.5)
    assert b == pytest.approx(24000.0)
    assert slope(xs, ys) == pytest.approx(48.5)


def test_slope_least_squares_by_hand() -> None:
    # points (0,1) (1,3) (2,2): mean x 1, mean y 2; sxy = (-1)(-1) + 0 + (1)(0) = 1; sxx = 2
    m, b = linear_fit([0.0, 1.0, 2.0], [1.0, 3.0, 2.0])
    assert m == pytest.approx(0.5)
    assert b == pytest.approx(1.5)


def test_slope_errors() -> None:
    with pytest.raises(ValueError):
        slope([1.0], [2.0])
    with pytest.raises(ValueError):
        slope([1.0, 1.0], [2.0, 3.0])
    with pytest.raises(ValueError):
        slope([1.0, 2.0], [2.0])


@given(
    st.lists(st.integers(min_value=0, max_value=1000), min_size=2, max_size=20, unique=True),
    st.floats(min_value=-1e4, max_value=1e4),
    st.floats(min_value=-1e4, max_value=1e4),
)
def test_slope_recovers_any_line(xs: list[int], m: float, b: float) -> None:
    fx = [float(x) for x in xs]
    assert slope(fx, [m * x + b for x in fx]) == pytest.approx(m, rel=1e-6, abs=1e-6)


def test_parse_rfc3339_ns() -> None:
    assert parse_rfc3339_ns("1970-01-01T00:00:01Z") == 1_000_000_000
    assert parse_rfc3339_ns("2026-11-22T00:14:35.721606002Z") == 1795306475_721606002
    assert parse_rfc3339_ns("2026-11-22T00:14:35.7216Z") == 1795306475_721600000
    assert parse_rfc3339_ns("2026-11-22T01:14:35.5+01:00") == 1795306475_500000000
    with pytest.raises(ValueError):
        parse_rfc3339_ns("2026-11-22 00:14:35Z")


def test_parse_event_time_ns() -> None:
    line = (
        "2026-11-22 00:14:35.722087497 +0000 UTC test /tasks/exit "
        '{"container_id":"e2","id":"e2","pid":29998,"exit_status":3}'
    )
    assert parse_event_time_ns(line) == 1795306475_722087497
    assert (
        parse_event_time_ns("2026-11-22 00:14:35 -0130 X ns /t {}")
        == (1795306475 + 5400) * 1_000_000_000
    )
    assert parse_event_time_ns("garbage") is None


def test_order_alternates() -> None:
    assert _order(0, ["a", "b"]) == ["a", "b"]
    assert _order(1, ["a", "b"]) == ["b", "a"]
    assert _order(4, ["a", "b", "c"]) == ["b", "c", "a"]
