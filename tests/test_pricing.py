"""The price table: exact costs from the operator's file, unknown models unpriced, clear errors."""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path

import pytest

from agentd.server.pricing import ModelPrice, PriceFile, load_prices, nano_dollars, parse_prices
from agentd.server.runtime.errors import AppConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "prices.example.yaml"


def test_the_example_file_loads_and_prices_its_models() -> None:
    table = load_prices(EXAMPLE)
    assert "gpt-4.1-mini" in table.models and "o4-mini" in table.models
    # 1,000 input (200 cached) and 500 output tokens on gpt-4.1-mini: 800 × 0.40 + 200 × 0.10 + 500 × 1.60 per 1M.
    assert table.cost("gpt-4.1-mini", 1000, 500, cached_input_tokens=200) == Decimal("0.00114")


def test_an_unknown_model_costs_unknown_never_a_guess() -> None:
    table = load_prices(EXAMPLE)
    assert table.cost("gpt-4.1-mini-2025-04-14", 1000, 500) is None
    assert table.cost("my-local-llama", 1, 1) is None


def test_cached_and_reasoning_tokens_are_parts_of_input_and_output() -> None:
    price = ModelPrice(input=Decimal("1"), output=Decimal("4"), cached_input=Decimal("0.25"), reasoning=Decimal("8"))
    # 100 input of which 40 cached; 50 output of which 10 reasoning.
    assert price.cost(100, 50, 40, 10) * 1_000_000 == 60 * 1 + 40 * Decimal("0.25") + 40 * 4 + 10 * 8
    # Without their own prices, cached input costs the input price and reasoning the output price.
    plain = ModelPrice(input=Decimal("1"), output=Decimal("4"))
    assert plain.cost(100, 50, 40, 10) == plain.cost(100, 50)
    # Counts an endpoint got wrong (more cached than input) never make a cost negative.
    assert price.cost(10, 5, 999, 999) == (10 * Decimal("0.25") + 5 * 8) / 1_000_000


def test_costs_leave_agentd_in_whole_nano_dollars() -> None:
    assert nano_dollars(Decimal("0.00114")) == 1_140_000
    assert nano_dollars(Decimal("0.0000000375")) == 38  # half to even: 37.5 → 38
    assert nano_dollars(Decimal("0.0000000365")) == 36


@pytest.mark.parametrize(("data", "message"), [
    ([], "expected a mapping with 'models'"),
    ({"models": {"m": {"input": 1}}}, "model 'm': 'output' (USD per 1M tokens) is required"),
    ({"models": {"m": {"input": 1, "output": -2}}}, "'output' must be a finite price of at least 0"),
    ({"models": {"m": {"input": "cheap", "output": 1}}}, "'input' must be a number of USD per 1M tokens"),
    ({"models": {"m": {"input": 1, "output": 1, "outptu": 1}}}, "unknown key(s) outptu"),
    ({"currency": "EUR", "models": {}}, "currency 'EUR' is not supported"),
    ({"models": {"m": True}}, "expected a mapping of prices"),
    ({"models": {"m": {"input": True, "output": 1}}}, "'input' must be a number"),
    ({"models": {"m": {"input": "NaN", "output": 1}}}, "must be a finite price"),
])
def test_a_bad_table_names_the_model_and_what_to_fix(data: object, message: str) -> None:
    with pytest.raises(AppConfigError) as info:
        parse_prices(data, "prices.yaml")
    assert message in str(info.value) and str(info.value).startswith("prices.yaml")


def test_a_file_that_does_not_parse_or_exist_is_a_config_error(tmp_path: Path) -> None:
    broken = tmp_path / "prices.yaml"
    broken.write_text("models: [unclosed\n")
    with pytest.raises(AppConfigError, match="does not parse"):
        load_prices(broken)
    with pytest.raises(AppConfigError, match="cannot read the price file"):
        load_prices(tmp_path / "missing.json")


def test_json_files_load_too(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text('{"models": {"m": {"input": 3, "output": 15}}}')
    assert load_prices(path).cost("m", 1_000_000, 1_000_000) == Decimal("18")


def test_a_changed_file_applies_without_a_restart_and_a_broken_one_keeps_the_last_table(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("models:\n  m: {input: 1, output: 1}\n")
    prices = PriceFile(path, recheck_s=0)
    assert prices.table.cost("m", 1_000_000, 0) == Decimal("1")
    path.write_text("models:\n  m: {input: 2, output: 1}\n  n: {input: 1, output: 1}\n")
    os.utime(path, ns=(1, 1))  # a different signature even within the file system's time resolution
    assert prices.table.cost("m", 1_000_000, 0) == Decimal("2") and prices.table.price("n") is not None
    path.write_text("models: [broken\n")
    os.utime(path, ns=(2, 2))
    assert prices.table.cost("m", 1_000_000, 0) == Decimal("2")
