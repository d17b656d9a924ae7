"""gpucnn.validate, the one vocabulary of argument checks: what each takes and refuses,
and that a message names the argument, what it got and what it needs."""
import math

import numpy
import pytest

from gpucnn import validate


@pytest.mark.parametrize("value", [3, numpy.int64(3), numpy.uint8(3)])
def test_integers_come_back_as_python_ints(value):
    out = validate.positive_int(value, "n")
    assert out == 3 and type(out) is int


@pytest.mark.parametrize("value, shown", [(True, "True"), (2.0, "float 2.0"), ("2", "str '2'"),
                                          (None, "None")])
def test_a_non_integer_is_refused_with_its_type(value, shown):
    with pytest.raises(ValueError, match=rf"^n must be a positive int, got {shown}$"):
        validate.positive_int(value, "n")
    with pytest.raises(TypeError, match="n must be a positive int"):
        validate.positive_int(value, "n", type_error=TypeError)


def test_a_value_out_of_range_is_the_range_error_even_with_type_error():
    with pytest.raises(ValueError, match=r"^n must be an int >= 2, got 1$"):
        validate.integer(numpy.int64(1), "n", 2, type_error=TypeError)


@pytest.mark.parametrize("kwargs, value, need", [
    (dict(low=0, low_open=True), 0, "a positive number"),
    (dict(low=0.0), -1, "a number >= 0.0"),
    (dict(low=0, high=1, high_open=True), 1.0, r"a number in \[0, 1\)"),
    (dict(high=5), 6, "a number <= 5"),
    ({}, math.nan, "a finite number"),
    ({}, True, "a finite number"),
])
def test_numbers_outside_their_range_are_refused(kwargs, value, need):
    with pytest.raises(ValueError, match=rf"^x must be {need}, got "):
        validate.number(value, "x", **kwargs)


def test_numbers_accept_numpy_scalars_and_infinity_where_asked():
    assert validate.number(numpy.float32(0.5), "x", 0, 1) == 0.5
    assert validate.number(math.inf, "x", finite=False) == math.inf
    with pytest.raises(ValueError, match=r"got 2.0$"):
        validate.number(numpy.float64(2.0), "x", 0, 1)


def test_pairs_and_choices_and_bools():
    assert validate.pair(numpy.int32(2), "stride") == (2, 2)
    assert validate.pair([1, 3], "stride") == (1, 3)
    with pytest.raises(TypeError, match=r"stride must be an int or a pair of ints, got \(1, 2, 3\)"):
        validate.pair((1, 2, 3), "stride")
    with pytest.raises(ValueError, match=r"padding must be >= 0, got -1"):
        validate.pair(-1, "padding", minimum=0)
    with pytest.raises(ValueError, match=r"mode must be one of \('a', 'b'\), got 'c'"):
        validate.choice("c", "mode", ("a", "b"))
    with pytest.raises(TypeError, match="ceil_mode must be a bool, got 1"):
        validate.boolean(1, "ceil_mode")
