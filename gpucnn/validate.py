"""The checks every argument goes through, library and application alike.

Each check returns the value in its plain Python form (an int, a float, a pair)
or raises ``error`` (ValueError unless the caller's contract says otherwise:
ConfigError in the application) with one message that names the argument, what
it got and what it needs; ``type_error``, where given, is raised instead for a
value of the wrong type (TypeError, where PyTorch raises one). A bool is never taken for a number: ``True`` is an int to Python, not to
a user who wrote ``stride=True``.
"""
import math
import numbers


def is_int(value):
    """A Python or NumPy integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value):
    """A Python or NumPy real number (an int or a float) that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(value, name, minimum=None, *, error=ValueError, type_error=None, what=None):
    """An int >= minimum (any int where minimum is None), as a Python int.
    what: how the message says what is needed, e.g. 'a number of steps >= 0'."""
    need = what or ("an int" if minimum is None else
                    "a positive int" if minimum == 1 else f"an int >= {minimum}")
    if not is_int(value):
        raise (type_error or error)(f"{name} must be {need}, got {_typed(value)}")
    if minimum is not None and value < minimum:
        raise error(f"{name} must be {need}, got {int(value)!r}")
    return int(value)


def positive_int(value, name, *, error=ValueError, type_error=None, what=None):
    """An int >= 1, as a Python int."""
    return integer(value, name, 1, error=error, type_error=type_error, what=what)


def number(value, name, low=None, high=None, *, low_open=False, high_open=False,
           finite=True, error=ValueError, type_error=None, what=None):
    """A real number within [low, high] (an end None is open-ended; low_open and
    high_open exclude that end), finite unless finite=False, as a float. NaN and
    the infinities count as of the wrong type where finite."""
    need = what or _range_text(low, high, low_open, high_open)
    if not is_real(value) or (finite and not math.isfinite(value)):
        shown = _typed(value) if not is_real(value) else repr(float(value))
        raise (type_error or error)(f"{name} must be {need}, got {shown}")
    bad = False
    if low is not None:
        bad = value <= low if low_open else value < low
    if not bad and high is not None:
        bad = value >= high if high_open else value > high
    if bad:
        raise error(f"{name} must be {need}, got {_plain(value)!r}")
    return float(value)


def _plain(value):
    """A NumPy scalar as the Python number it holds (its repr then reads 2, not np.int64(2))."""
    return int(value) if is_int(value) else float(value)


def _typed(value):
    """A value of the wrong type as a message shows it: with its type (float 2.5,
    str '2'), but for a bool or None, whose repr says it already."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    return f"{type(value).__name__} {value!r}"


def _range_text(low, high, low_open, high_open):
    if low is None and high is None:
        return "a finite number"
    if high is None:
        if low == 0 and low_open:
            return "a positive number"
        return f"a number {'>' if low_open else '>='} {low}"
    if low is None:
        return f"a number {'<' if high_open else '<='} {high}"
    return f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def pair(value, name, minimum=1, *, error=ValueError):
    """An int or a pair of ints -> (a, b), each >= minimum. A value of the wrong
    type is a TypeError (as in PyTorch); one below the minimum is `error`."""
    if is_int(value):
        out = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(map(is_int, value)):
        out = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(out) < minimum:
        need = "positive" if minimum == 1 else f">= {minimum}"
        raise error(f"{name} must be {need}, got {value!r}")
    return out


def boolean(value, name, *, error=TypeError):
    """True or False (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise error(f"{name} must be a bool, got {value!r}")
    return value


def choice(value, name, choices, *, error=ValueError):
    """One of `choices` (compared with ==)."""
    if value not in choices:
        raise error(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
