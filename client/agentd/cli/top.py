"""``agentd top``: a live view of every replica, refreshed in place.

Each refresh asks every given replica for ``StatsService.GetLiveStats`` at once (one channel per
replica, the calls in flight together, each bounded by a timeout) and draws one frame: a row per
replica (its runs executing, the shared queue as it reads it, the leases it holds, how much of
its capacity is used) and the totals (runs per minute over the last minutes with their trend,
success rate, cost today, the most frequent errors). A replica that does not answer is shown as
down with the reason, and the view goes on.

Adding up. Active runs, leases and capacity are each replica's own: they are added. The queue is
shared by every replica on one run store: the total is the largest depth any replica reports.
The recent figures come from the trace archive, which replicas usually share: one answer is
taken per distinct ``archive`` id (replicas with the memory trace store each have their own), and
those are added.

On a terminal each frame replaces the last (cursor home, clear screen); otherwise (a pipe, a
file, a test) the frames follow each other, each starting with its ``agentd top ·`` title line.
``--iterations N`` stops after N frames; Ctrl-C stops at once, exit status 0.
"""

from __future__ import annotations

import io
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence, TextIO

import grpc
from rich.console import Console, Group
from rich.text import Text

from agentd.cli.render import error_code_name, usd
from agentd.cli.table import Cell, Column, FittedTable, spark, terminal_width
from agentd.v1 import stats_service_pb2, stats_service_pb2_grpc

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen
# An answer slower than this (or than the interval, if longer) is a replica down for this frame.
MIN_TIMEOUT_S = 3.0
MAX_TIMEOUT_S = 5.0
TOP_ERRORS = 3
MAX_REASON = 100


def parse_targets(text: str) -> list[str]:
    """The replicas to ask: ``host:port`` entries separated by commas (an ``ipv4:``/``ipv6:`` list
    as the client takes it works too); a ``dns:``/``unix:`` target is one entry."""
    stripped = text.strip()
    for scheme in ("ipv4:", "ipv6:"):
        if stripped.startswith(scheme):
            stripped = stripped[len(scheme):]
    if stripped.startswith(("dns:", "unix:", "unix-abstract:", "vsock:", "xds:")):
        return [stripped]
    targets = [t.strip() for t in stripped.split(",") if t.strip()]
    if not targets:
        raise ValueError("no target: give host:port[,host:port...]")
    return targets


@dataclass
class Answer:
    """One replica's answer for one frame: the response, or why there is none."""

    target: str
    response: stats_service_pb2.GetLiveStatsResponse | None = None
    error: str = ""


def _why(exc: grpc.RpcError) -> str:
    """The status code and the first line of its details, cut at ``MAX_REASON`` characters."""
    code = exc.code()  # type: ignore[attr-defined]
    details = ((exc.details() or "").splitlines() or [""])[0]  # type: ignore[attr-defined]
    reason = f"{code.name}: {details}" if details else code.name
    return reason if len(reason) <= MAX_REASON else reason[:MAX_REASON - 1] + "…"


class Replicas:
    """A channel and a StatsService stub per target."""

    def __init__(self, targets: Sequence[str], *, tls=None, token: str | None = None) -> None:  # tls: TlsConfig | None
        from agentd.client import SyncAgentdClient

        self.targets = list(targets)
        self._clients = [SyncAgentdClient(t, retry=False, tls=tls, token=token) for t in self.targets]
        self._stubs = [stats_service_pb2_grpc.StatsServiceStub(c._channel) for c in self._clients]

    def ask(self, minutes: int, timeout_s: float) -> list[Answer]:
        """Every replica's answer, the calls in flight together."""
        request = stats_service_pb2.GetLiveStatsRequest(minutes=minutes)
        calls: list[tuple[str, grpc.Future | None, str]] = []
        for target, stub in zip(self.targets, self._stubs):
            try:
                calls.append((target, stub.GetLiveStats.future(request, timeout=timeout_s), ""))
            except grpc.RpcError as exc:  # (a call future is an RpcError too: told apart by the slot)
                calls.append((target, None, _why(exc)))
        answers = []
        for target, call, error in calls:
            if call is None:
                answers.append(Answer(target, error=error))
                continue
            try:
                answers.append(Answer(target, call.result()))
            except grpc.RpcError as exc:
                answers.append(Answer(target, error=_why(exc)))
        return answers

    def close(self) -> None:
        for client in self._clients:
            client.close()


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "–"


@dataclass
class Recent:
    """The recent figures added up over the distinct archives that answered."""

    minutes: int = 0
    per_minute: list[int] | None = None
    runs: int = 0
    completed: int = 0
    errors: dict[int, int] | None = None
    cost_nanos: int = 0
    runs_today: int = 0
    unpriced_today: int = 0
    archives: int = 0
    unavailable: str = ""


def add_up_recent(answers: Sequence[Answer]) -> Recent:
    total = Recent(errors={})
    seen: set[str] = set()
    for answer in answers:
        response = answer.response
        if response is None:
            continue
        if not response.HasField("recent"):
            total.unavailable = total.unavailable or response.recent_error or "the trace archive is unavailable"
            continue
        if response.archive in seen:
            continue
        seen.add(response.archive)
        recent = response.recent
        values = list(recent.runs_per_minute)
        if total.per_minute is None:
            total.per_minute = values
        else:  # the same window length (one request for all): add minute by minute, newest aligned
            size = max(len(total.per_minute), len(values))
            mine = [0] * (size - len(total.per_minute)) + total.per_minute
            theirs = [0] * (size - len(values)) + values
            total.per_minute = [a + b for a, b in zip(mine, theirs)]
        total.runs += recent.runs
        total.completed += recent.completed_runs
        for entry in recent.top_errors:
            total.errors[entry.code] = total.errors.get(entry.code, 0) + entry.runs  # type: ignore[index]
        total.cost_nanos += recent.cost_today.units * 1_000_000_000 + recent.cost_today.nanos
        total.runs_today += recent.runs_today
        total.unpriced_today += recent.unpriced_runs_today
        total.archives += 1
    total.minutes = len(total.per_minute or [])
    return total


def frame(answers: Sequence[Answer], *, minutes: int, interval_s: float, now: datetime | None = None) -> Group:
    """One screen: the title, a row per replica, the totals."""
    now = now or datetime.now(timezone.utc)
    up = [a for a in answers if a.response is not None]
    title = ["agentd top", f"· {now:%Y-%m-%d %H:%M:%S} UTC", f"· {len(up)} of {len(answers)} replica(s) up",
             f"· every {interval_s:g}s"]
    columns = [
        Column("replica", priority=100, min_width=10),
        Column("state", priority=99),
        Column("active", priority=98, justify="right"),
        Column("queued", priority=96, justify="right"),
        Column("leases", priority=97, justify="right"),
        Column("capacity used", priority=95, justify="right"),
        Column("target", priority=50, min_width=12, optional=True),
    ]
    rows: list[list[Cell]] = []
    notes: list[Text] = []
    active = leases = capacity = 0
    queued: int | None = None
    for answer in answers:
        response = answer.response
        if response is None:
            rows.append([Text(answer.target, style="red"), Text("down", style="bold red"), "–", "–", "–", "–",
                         answer.target])
            notes.append(Text(f"{answer.target}: down ({answer.error})", style="red"))
            continue
        state = Text("draining", style="yellow") if response.draining else Text("up", style="green")
        depth = str(response.queued_runs) if response.HasField("queued_runs") else "?"
        used = f"{response.active_runs}/{response.max_active_runs} {_percent(response.active_runs, response.max_active_runs)}"
        rows.append([response.replica or answer.target, state, str(response.active_runs), depth,
                     str(response.leases_held), used, answer.target])
        active += response.active_runs
        leases += response.leases_held
        capacity += response.max_active_runs
        if response.HasField("queued_runs"):
            queued = max(queued or 0, response.queued_runs)
    rows.append([Text("total", style="bold"), f"{len(up)}/{len(answers)} up", str(active),
                 "?" if queued is None and up else str(queued or 0), str(leases),
                 f"{active}/{capacity} {_percent(active, capacity)}", ""])
    table = FittedTable(columns, rows, title=title, notes=notes)
    return Group(table, _recent_lines(add_up_recent(answers), minutes))


def _recent_lines(recent: Recent, minutes: int) -> Text:
    if recent.archives == 0:
        why = recent.unavailable or "no replica answered"
        return Text(f"last {minutes} min: unavailable ({why})", style="dim")
    per_minute = recent.per_minute or []
    rate = sum(per_minute) / len(per_minute) if per_minute else 0.0
    success = f"{100 * recent.completed / recent.runs:.1f}%" if recent.runs else "–"
    errors = sorted((recent.errors or {}).items(), key=lambda item: (-item[1], item[0]))
    shown = ", ".join(f"{error_code_name(code)} {count}" for code, count in errors[:TOP_ERRORS]) or "none"
    if len(errors) > TOP_ERRORS:
        shown += f", +{len(errors) - TOP_ERRORS} more"
    from google.type import money_pb2

    cost = usd(money_pb2.Money(currency_code="USD", units=recent.cost_nanos // 1_000_000_000,
                               nanos=recent.cost_nanos % 1_000_000_000))
    unpriced = f", {recent.unpriced_today} unpriced" if recent.unpriced_today else ""
    text = Text()
    text.append(f"last {minutes} min: ", style="bold")
    text.append(f"{rate:.1f} runs/min ")
    text.append(spark(per_minute) or "", style="cyan")
    text.append(f" · success {success} ({recent.runs} run(s)) · top errors: {shown}\n")
    text.append("today (UTC): ", style="bold")
    text.append(f"cost {cost} · {recent.runs_today} run(s){unpriced}")
    if recent.unavailable:
        text.append(f"\n(some replicas could not read their trace archive: {recent.unavailable})", style="dim")
    return text


def render(renderable: Group, *, width: int, terminal: bool) -> str:
    """The frame as text for ``width`` columns (styled only for a terminal)."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, highlight=False, soft_wrap=False, force_terminal=terminal,
                      color_system="standard" if terminal else None)
    console.print(renderable, crop=False)
    return buffer.getvalue()


def run_top(
    targets: Sequence[str], *, interval_s: float, iterations: int, minutes: int, tls=None, token: str | None = None,
    out: TextIO | None = None,
) -> int:
    out = out or sys.stdout
    terminal = out.isatty()
    timeout_s = min(max(interval_s, MIN_TIMEOUT_S), MAX_TIMEOUT_S)
    replicas = Replicas(targets, tls=tls, token=token)
    drawn = 0
    try:
        while True:
            started = time.monotonic()
            answers = replicas.ask(minutes, timeout_s)
            text = render(frame(answers, minutes=minutes, interval_s=interval_s), width=terminal_width(out),
                          terminal=terminal)
            out.write((CLEAR + text) if terminal else (text if drawn == 0 else "\n" + text))
            out.flush()
            drawn += 1
            if iterations and drawn >= iterations:
                return 0
            time.sleep(max(interval_s - (time.monotonic() - started), 0))
    except KeyboardInterrupt:
        if terminal:
            out.write("\n")
        return 0
    finally:
        replicas.close()
