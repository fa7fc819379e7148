"""Versioned schema migrations, shipped as package data.

Every engine that keeps a schema (the Postgres and SQLite session and agent stores, the
Postgres run store, the trace archives) holds its migrations as ``.sql`` files in a
``migrations`` folder of its own package: ``0001_<what>.sql``, ``0002_<what>.sql``, ...
Version N is the file numbered N. They are append-only: never edit a released file
(a database that applied it will not apply it again); add the next one. They are applied
by ``postgres_common.apply_migrations`` and ``sqlite_worker.apply_migrations``.
"""

from __future__ import annotations

from importlib.resources import files

__all__ = ["load_migrations"]


def load_migrations(package: str) -> tuple[str, ...]:
    """The text of every migration in ``package``'s ``migrations`` folder, in version order
    (version N at index N - 1); ``ValueError`` unless they are numbered 1, 2, 3, ... with
    neither gaps nor repeats."""
    found: dict[int, str] = {}
    for entry in files(package).joinpath("migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        number, sep, _ = entry.name.partition("_")
        if not (sep and number.isdigit()):
            raise ValueError(f"{package}: migration {entry.name} is not named <number>_<what>.sql")
        if int(number) in found:
            raise ValueError(f"{package}: two migrations are numbered {int(number)}")
        found[int(number)] = entry.read_text(encoding="utf-8")
    versions = sorted(found)
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"{package}: migrations must be numbered 1 to N without gaps, found {versions}")
    return tuple(found[version] for version in versions)
