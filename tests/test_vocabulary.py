"""One vocabulary: every view prints a size the same way and names the blocks from one table."""

import pytest

from vramtop_agent import schema
from vramtop_agent.vocabulary import BLOCK_KEYS, BLOCKS, COLOURS, LABELS, fmt_bytes, is_number, parse_bytes


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (150 * 2**20, "150 MiB"), (12.34 * 2**20, "12.3 MiB"),
    (1023.999 * 2**20, "1.00 GiB"), (5 * 2**40, "5.00 TiB"), (-3 * 2**30, "-3.00 GiB"), (99.96 * 2**20, "100 MiB"),
    (None, "-"), (float("nan"), "-"), (float("inf"), "-"), (True, "-"), ("12", "-"), (10**400, "-"),
])
def test_one_byte_formatter_three_significant_digits(n, text):
    assert fmt_bytes(n) == text


def test_every_view_uses_the_same_formatter():
    from vramtop import alerts, budget, creep_report, diff, gpus, replay, report  # noqa: F401
    from vramtop.tui import render
    from vramtop_agent import estimator

    assert render.fmt_bytes is report.fmt_bytes is estimator.fmt_bytes is fmt_bytes
    assert report.fmt_bytes(150 * 2**20) == render.fmt_bytes(150 * 2**20) == "150 MiB"


def test_the_wire_blocks_are_the_table_rows():
    assert schema.BLOCK_KEYS == BLOCK_KEYS == tuple(b.key for b in BLOCKS)
    assert all(k in COLOURS and k in LABELS for k in BLOCK_KEYS)


def test_sizes_parse_in_both_unit_systems():
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("80 GB") == 80 * 10**9
    assert parse_bytes("1.5e9") == 1_500_000_000
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")
    assert not is_number(True) and not is_number(float("nan")) and is_number(3) and is_number(10**400)
