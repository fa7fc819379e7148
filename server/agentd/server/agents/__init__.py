"""Agents as data: versioned definitions callers create, update and route to through aliases."""
