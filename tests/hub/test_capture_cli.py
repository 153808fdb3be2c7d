"""`outpost capture`: the sample as a percentage turned into basis points, and the policy in words."""

from __future__ import annotations

import argparse

import pytest

from hub.capture.cli import policy_text, sample_bp
from hub.operator_cli import main


@pytest.mark.parametrize(
    ("text", "bp"),
    [("5%", 500), ("0.5%", 50), ("0.01%", 1), ("100%", 10_000), ("12.34%", 1234), ("7", 700), (" 2 % ", 200)],
    ids=["five", "half", "lowest", "all", "two-decimals", "no-sign", "spaces"],
)
def test_a_sample_in_percent_is_basis_points(text: str, bp: int) -> None:
    assert sample_bp(text) == bp


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("0.001%", "from 0.01% to 100%"),
        ("0%", "from 0.01% to 100%"),
        ("100.01%", "from 0.01% to 100%"),
        ("0.015%", "steps of 0.01%"),
        ("-5%", "not a percentage"),
        ("five", "not a percentage"),
    ],
    ids=["too-small", "zero", "over", "finer-than-bp", "negative", "words"],
)
def test_a_bad_sample_is_refused(text: str, says: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        sample_bp(text)


def test_the_policy_in_words() -> None:
    assert policy_text(None) == "off"
    assert policy_text({"sample_bp": 50, "max_rows_per_min": 60}) == (
        "0.5% of requests, at most 60 a minute per device"
    )
    assert policy_text({"sample_bp": 10_000, "max_rows_per_min": 1}).startswith("100% of requests")


def test_start_refuses_a_bad_sample_before_calling_the_hub(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capture", "start", "--group", "lab", "--sample", "200%", "--token", "t"]) == 2
    assert "from 0.01% to 100%" in capsys.readouterr().err
