"""Runs as shared resources: records, event logs, the work queue, and this replica's executions.

- ``records``: statuses, policies, ``RunRecord`` and the errors of managing runs.
- ``base``: the ``RunStore`` and ``ControlBus`` interfaces; ``memory`` and the packages
  ``redis`` and ``postgres`` implement them; ``factory`` picks one from the settings.
- ``codec``: the JSON every engine stores.
- ``active``: one execution on this replica (the run loop's event sink).
- ``manager``: this replica's executions, claiming, leases, takeover, drain, watching.
"""
