import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynamem.errors import UserError
from dynamem.units import GiB, MiB, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 * MiB),
        ("1G", GiB),
        ("1g", GiB),
        ("1GiB", GiB),
        ("1.5G", 3 * GiB // 2),
        ("4096", 4096),
        ("2M", 2 * MiB),
        (" 128 MiB ", 128 * MiB),
    ],
)
def test_parse_size_accepts_binary_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["1X", "", "-5G", "G", "1..5G", "0x10M", "1 G B"])
def test_parse_size_rejects_malformed_with_the_text_in_the_message(text):
    with pytest.raises(UserError, match="malformed") as info:
        parse_size(text)
    assert repr(text) in str(info.value)


def test_zero_is_refused_unless_allowed():
    with pytest.raises(UserError, match="greater than zero"):
        parse_size("0M")
    assert parse_size("0", allow_zero=True) == 0


def test_fractional_bytes_are_refused():
    with pytest.raises(UserError, match="whole number"):
        parse_size("1.5")


@given(st.integers(min_value=1, max_value=1 << 50))
def test_format_then_parse_round_trips(size):
    assert parse_size(format_size(size)) == size


def test_format_size_uses_largest_exact_unit():
    assert format_size(GiB) == "1G"
    assert format_size(1536 * MiB) == "1536M"
    assert format_size(1000) == "1000"
