"""Agents: OS processes started, watched and restarted under policies, visible to every process.

``Supervisor`` owns the processes; ``list_agents``, ``find_agents_by_capability`` and
``find_agents_by_type`` read them from any process, supervisor alive or not; ``current()``
is the agent's view of itself. ``docs/agents.md`` has the whole story.
"""

from shmreg.agents._config import RestartPolicy, validate_config
from shmreg.agents._control import request
from shmreg.agents._records import (
    AgentInfo,
    ExitInfo,
    find_agents_by_capability,
    find_agents_by_type,
    get_agent_info,
    list_agents,
)
from shmreg.agents._runner import AgentContext, current
from shmreg.agents._supervisor import STRATEGIES, Supervisor

__all__ = [
    "STRATEGIES",
    "AgentContext",
    "AgentInfo",
    "ExitInfo",
    "RestartPolicy",
    "Supervisor",
    "current",
    "find_agents_by_capability",
    "find_agents_by_type",
    "get_agent_info",
    "list_agents",
    "request",
    "validate_config",
]
