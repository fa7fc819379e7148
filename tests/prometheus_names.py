"""What Prometheus calls agentd's OTLP metrics, and which metric and label names a PromQL
expression uses: the two halves of "the dashboard and the alerts name what agentd exports".

Naming: the OpenTelemetry Collector's prometheus exporter with
``translation_strategy: UnderscoreEscapingWithSuffixes`` (deploy/otel-collector.yaml) builds names
with github.com/prometheus/otlptranslator (``MetricNamer{WithMetricSuffixes: true,
UTF8Allowed: false}``: metric_namer.go ``normalizeName``, unit_namer.go, and ``LabelNamer``),
ported here rule for rule:

- the name is split into words at every character outside ``[a-zA-Z0-9:]`` (so ``.`` and ``_``
  alike, and runs of them collapse), and the words are joined with ``_``;
- the unit ``main/per`` adds a word for ``main`` (mapped: ``s`` → ``seconds``, ``By`` → ``bytes``,
  ``1`` → nothing...; a unit in braces such as ``{run}`` adds nothing; an unmapped unit is kept,
  cleaned: ``USD`` → ``USD``) unless the name already holds that word, and ``per_<unit>`` for
  ``per`` (``s`` → ``second``...);
- a monotonic sum (counter) ends in ``total`` (moved to the end if the name has it), a gauge with
  unit ``1`` in ``ratio``; a leading digit gets a ``_`` prefix;
- a histogram is exposed as ``<name>_bucket`` (label ``le``), ``<name>_sum`` and ``<name>_count``;
- attribute keys become labels with every character outside ``[a-zA-Z0-9_]`` replaced by ``_``,
  runs of ``_`` collapsed, and ``key_`` before a leading digit;
- the exporter adds ``otel_scope_name``, ``otel_scope_version``, ``otel_scope_schema_url``, and
  ``job`` (from ``service.namespace``/``service.name``) and ``instance`` (``service.instance.id``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

UNIT_MAP = {
    "d": "days", "h": "hours", "min": "minutes", "s": "seconds", "ms": "milliseconds", "us": "microseconds",
    "ns": "nanoseconds", "By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes", "GiBy": "gibibytes",
    "TiBy": "tibibytes", "KBy": "kilobytes", "MBy": "megabytes", "GBy": "gigabytes", "TBy": "terabytes",
    "m": "meters", "V": "volts", "A": "amperes", "J": "joules", "W": "watts", "g": "grams",
    "Cel": "celsius", "Hz": "hertz", "1": "", "%": "percent",
}
PER_UNIT_MAP = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week", "mo": "month", "y": "year"}
EXPORTER_LABELS = {"otel_scope_name", "otel_scope_version", "otel_scope_schema_url", "job", "instance"}

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"


def _valid_metric_char(ch: str) -> bool:
    return ch.isascii() and (ch.isalnum() or ch == ":")


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[^a-zA-Z0-9:]+", name) if w]


def _clean_unit(unit: str) -> str:
    replaced = "".join(ch if _valid_metric_char(ch) else "_" for ch in unit)
    return re.sub(r"_+", "_", replaced).removeprefix("_")


def _unit_suffixes(unit: str) -> tuple[str, str]:
    parts = unit.split("/", 1)
    main = ""
    main_otel = parts[0].strip()
    if main_otel and not any(c in main_otel for c in "{}"):
        main = UNIT_MAP.get(main_otel, main_otel)
    per = ""
    if len(parts) > 1 and parts[1]:
        per_otel = parts[1].strip()
        if per_otel and not any(c in per_otel for c in "{}"):
            per = PER_UNIT_MAP.get(per_otel, per_otel)
        if per:
            per = "per_" + per
    return main, per


def metric_name(name: str, unit: str, kind: str) -> str:
    """The Prometheus name of an OTLP metric (``kind``: counter, gauge or histogram; a
    non-monotonic sum is a gauge)."""
    words = _words(name)
    main, per = (_clean_unit(u) for u in _unit_suffixes(unit))
    if main in words:
        main = ""
    if per == "per_":
        per = ""
    else:
        per = per.removesuffix("_")
        if per in words:
            per = ""
    if per:
        main = main.removesuffix("_")
    if main:
        words.append(main)
    if per:
        words.append(per)
    if kind == COUNTER:
        words = [w for w in words if w != "total"] + ["total"]
    if unit == "1" and kind == GAUGE:
        words = [w for w in words if w != "ratio"] + ["ratio"]
    result = "_".join(words)
    return "_" + result if result[:1].isdigit() else result


def label_name(key: str) -> str:
    replaced = re.sub(r"_+", "_", re.sub(r"[^a-zA-Z0-9_]", "_", key))
    return "key_" + replaced if replaced[:1].isdigit() else replaced


@dataclass
class Series:
    """The Prometheus series names of one OTLP metric, with their labels and the values seen."""

    otlp_name: str
    names: list[str]
    labels: set[str] = field(default_factory=set)
    values: dict[str, set[str]] = field(default_factory=dict)


def series_of(otlp_name: str, unit: str, kind: str, attribute_sets: list[dict[str, object]]) -> list[Series]:
    base = metric_name(otlp_name, unit, kind)
    labels: set[str] = set(EXPORTER_LABELS)
    values: dict[str, set[str]] = {}
    for attributes in attribute_sets:
        for key, value in attributes.items():
            label = label_name(key)
            labels.add(label)
            values.setdefault(label, set()).add(str(value).lower() if isinstance(value, bool) else str(value))
    if kind != HISTOGRAM:
        return [Series(otlp_name, [base], labels, values)]
    return [
        Series(otlp_name, [base + "_bucket"], labels | {"le"}, values),
        Series(otlp_name, [base + "_sum", base + "_count"], labels, values),
    ]


# --- PromQL: which metric and label names an expression uses ------------------------------

FUNCTIONS = {
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor", "histogram_avg",
    "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_stddev", "histogram_stdvar",
    "histogram_sum", "holt_winters", "double_exponential_smoothing", "hour", "idelta", "increase", "irate",
    "label_join", "label_replace", "ln", "log10", "log2", "minute", "month", "predict_linear", "rate", "resets",
    "round", "scalar", "sgn", "sort", "sort_desc", "sort_by_label", "sort_by_label_desc", "sqrt", "time",
    "timestamp", "vector", "year", "avg_over_time", "min_over_time", "max_over_time", "sum_over_time",
    "count_over_time", "quantile_over_time", "stddev_over_time", "stdvar_over_time", "last_over_time",
    "present_over_time", "mad_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh", "cos", "cosh",
    "sin", "sinh", "tan", "tanh", "deg", "rad", "pi",
}
AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio",
}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
            "group_right", "inf", "nan", "atan2", "start", "end"}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"\{([^}]*)\}")
_MATCHER = re.compile(r"\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*(\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*')\s*")
_IDENTIFIER = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$__\w+|\$\w+")


@dataclass
class Usage:
    """What one PromQL expression refers to."""

    metrics: set[str] = field(default_factory=set)
    grouping_labels: set[str] = field(default_factory=set)  # in by/without/on/ignoring/group_*
    matchers: list[tuple[str, str, str]] = field(default_factory=list)  # (label, op, value)


def promql_usage(expr: str) -> Usage:
    """The metric names, grouping labels and label matchers of ``expr`` (Grafana variables such as
    ``$__rate_interval`` or ``$agent`` allowed). Not a parser: a tokenizer that knows PromQL's
    keywords, functions and aggregations, enough for the expressions in deploy/."""
    usage = Usage()
    text = _VARIABLE.sub("5m", expr)
    # Selectors first (their strings hold anything), then groupings, then what is left.
    def selector(match: re.Match[str]) -> str:
        body = match.group(1)
        position = 0
        while position < len(body):
            found = _MATCHER.match(body, position)
            assert found, f"cannot read the label matchers {{{body}}} of {expr!r}"
            usage.matchers.append((found.group(1), found.group(2), found.group(3)[1:-1]))
            position = found.end()
            if position < len(body):
                assert body[position] == ",", f"cannot read the label matchers {{{body}}} of {expr!r}"
                position += 1
        return " "

    text = _SELECTOR.sub(selector, text)
    text = _STRING.sub(" ", text)
    for match in _GROUPING.finditer(text):
        usage.grouping_labels |= {label.strip() for label in match.group(2).split(",") if label.strip()}
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries' [10m:1m]
    text = re.sub(r"(?<![\w:])\d[\w.]*", " ", text)  # numbers and durations
    for match in _IDENTIFIER.finditer(text):
        word = match.group(1)
        following = text[match.end():].lstrip()
        if word in KEYWORDS or word in AGGREGATIONS or (word in FUNCTIONS and following.startswith("(")):
            continue
        assert not following.startswith("("), f"unknown PromQL function {word!r} in {expr!r}"
        usage.metrics.add(word)
    return usage


def grafana_label_values(query: str) -> tuple[str, str] | None:
    """(metric, label) of a Grafana ``label_values(metric, label)`` variable query."""
    found = re.fullmatch(r"\s*label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*", query)
    return (found.group(1), found.group(2)) if found else None
