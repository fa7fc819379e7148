"""Test helpers for agentd users: a scripted OpenAI-compatible endpoint."""

from agentd.testing.scripted_openai import ScriptedOpenAIServer

__all__ = ["ScriptedOpenAIServer"]
