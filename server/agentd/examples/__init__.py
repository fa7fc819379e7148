"""Example apps shipped inside the package, so an installed agentd has something to serve.

``agentd serve`` and ``agentd demo`` default to ``agentd.examples.support:app``: it must
import from any working directory, not only from a checkout of the repository.
"""
