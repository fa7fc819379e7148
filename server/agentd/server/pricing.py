"""What model calls cost: a price table per model, set by the operator, and the cost of token counts.

Prices change, differ per contract and per provider, so agentd ships none: the operator
writes them in a YAML or JSON file (``AGENTD_PRICES_FILE``; ``deploy/prices.example.yaml``
shows the format with example prices). A model the table does not name costs *unknown*
(``None``), never a guess: cost figures then say how many calls were not priced.

Prices are in US dollars per million tokens, per model name exactly as agents name it:

    models:
      gpt-4.1-mini:
        input: 0.40          # per 1M input (prompt) tokens not read from the provider's cache
        cached_input: 0.10   # per 1M input tokens read from the cache (default: the input price)
        output: 1.60         # per 1M output tokens
        reasoning: 1.60      # per 1M reasoning tokens, a part of the output (default: the output price)

Costs are exact decimals (``decimal.Decimal``), rounded to the nano-dollar only where they
leave agentd (events, spans, metrics), so sums of many small calls do not drift.

The file is read again when it changes (checked at most once per ``recheck_s`` seconds), so
new prices apply without a restart; a file that stops parsing keeps the last good table and
is logged.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Mapping

import yaml

from agentd.server.runtime.errors import AppConfigError

log = logging.getLogger("agentd.pricing")

CURRENCY = "USD"
PER_TOKENS = Decimal(1_000_000)
NANO = Decimal("0.000000001")
_PRICE_KEYS = ("input", "cached_input", "output", "reasoning")


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """US dollars per million tokens of one model."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None
    reasoning: Decimal | None = None

    def cost(self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0,
             reasoning_tokens: int = 0) -> Decimal:
        """The exact cost of one call's tokens. Cached input tokens are part of the input tokens
        and reasoning tokens part of the output tokens, as the OpenAI APIs count them."""
        cached = min(max(cached_input_tokens, 0), input_tokens)
        reasoning = min(max(reasoning_tokens, 0), output_tokens)
        cached_price = self.input if self.cached_input is None else self.cached_input
        reasoning_price = self.output if self.reasoning is None else self.reasoning
        total = (
            (input_tokens - cached) * self.input
            + cached * cached_price
            + (output_tokens - reasoning) * self.output
            + reasoning * reasoning_price
        )
        return total / PER_TOKENS


def nano_dollars(amount: Decimal) -> int:
    """``amount`` in whole nano-dollars (half to even): how costs leave agentd."""
    return int((amount / NANO).to_integral_value())


class PriceTable:
    """Prices by model name; ``price(name)`` is None for a model the table does not name."""

    def __init__(self, prices: Mapping[str, ModelPrice] | None = None) -> None:
        self._prices = dict(prices or {})

    def price(self, model: str) -> ModelPrice | None:
        return self._prices.get(model)

    def cost(self, model: str, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0,
             reasoning_tokens: int = 0) -> Decimal | None:
        """The call's cost, or None when the model has no price."""
        price = self._prices.get(model)
        if price is None:
            return None
        return price.cost(input_tokens, output_tokens, cached_input_tokens, reasoning_tokens)

    @property
    def models(self) -> list[str]:
        return sorted(self._prices)


def parse_prices(data: Any, source: str = "the price table") -> PriceTable:
    """A price table from the parsed file: ``{"models": {name: {"input": ..., ...}}}``.

    Raises ``AppConfigError`` naming the model and the key to fix.
    """
    if not isinstance(data, dict) or set(data) - {"currency", "models"}:
        raise AppConfigError(f"{source}: expected a mapping with 'models' (and optionally 'currency: USD')")
    currency = data.get("currency", CURRENCY)
    if currency != CURRENCY:
        raise AppConfigError(f"{source}: currency {currency!r} is not supported; prices are in USD")
    models = data.get("models") or {}
    if not isinstance(models, dict):
        raise AppConfigError(f"{source}: 'models' must map model names to their prices")
    prices: dict[str, ModelPrice] = {}
    for name, entry in models.items():
        where = f"{source}: model {name!r}"
        if not isinstance(name, str) or not name:
            raise AppConfigError(f"{source}: model names must be non-empty strings, not {name!r}")
        if not isinstance(entry, dict):
            raise AppConfigError(f"{where}: expected a mapping of prices (input, output, cached_input, reasoning)")
        unknown = set(entry) - set(_PRICE_KEYS)
        if unknown:
            raise AppConfigError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                                 f"prices are {', '.join(_PRICE_KEYS)} (USD per 1M tokens)")
        for required in ("input", "output"):
            if required not in entry:
                raise AppConfigError(f"{where}: '{required}' (USD per 1M tokens) is required")
        values = {key: _price(where, key, entry[key]) for key in _PRICE_KEYS if key in entry}
        prices[name] = ModelPrice(values["input"], values["output"], values.get("cached_input"),
                                  values.get("reasoning"))
    return PriceTable(prices)


def _price(where: str, key: str, value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise AppConfigError(f"{where}: '{key}' must be a number of USD per 1M tokens, not {value!r}")
    try:
        price = Decimal(str(value))
    except InvalidOperation:
        raise AppConfigError(f"{where}: '{key}' must be a number of USD per 1M tokens, not {value!r}") from None
    if not price.is_finite() or price < 0:
        raise AppConfigError(f"{where}: '{key}' must be a finite price of at least 0, not {value!r}")
    return price


def load_prices(path: Path) -> PriceTable:
    """Read a price file (YAML, or JSON by its ``.json`` suffix)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AppConfigError(f"cannot read the price file {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise AppConfigError(f"the price file {path} does not parse: {exc}") from None
    return parse_prices(data if data is not None else {}, f"the price file {path}")


class PriceFile:
    """A price file that is read again when it changes, at most once per ``recheck_s``."""

    def __init__(self, path: Path, recheck_s: float = 5.0) -> None:
        self.path = path
        self._recheck_s = recheck_s
        self._table = load_prices(path)  # a broken file at start-up stops the server
        self._signature = self._stat()
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    @property
    def table(self) -> PriceTable:
        now = time.monotonic()
        if now - self._checked >= self._recheck_s:
            self._checked = now
            signature = self._stat()
            if signature != self._signature and signature is not None:
                self._signature = signature
                try:
                    self._table = load_prices(self.path)
                    log.info("price file %s reloaded: %d model(s)", self.path, len(self._table.models))
                except AppConfigError as exc:
                    log.error("%s; keeping the previous prices", exc)
        return self._table
