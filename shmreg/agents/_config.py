"""Agent configuration: validation of the user's dict, and the restart policy it names.

Validation collects every problem before raising, so one ``InvalidAgentConfig`` lists all the
missing and wrong fields at once. The validated config is a plain dict of msgpack-able values:
it is stored in the registry as it is, and a restarted supervisor rebuilds everything from it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from shmreg._errors import InvalidAgentConfig

__all__ = ["RESTART_TYPES", "RestartPolicy", "validate_config"]

RESTART_TYPES: Final = ("permanent", "transient", "temporary")

#: Defaults close to supervisord's ``startretries=3`` and OTP's intensity, loosened a little
#: because an agent is a whole process: more than 5 restarts in 10 s and it goes to ``failed``.
_POLICY_DEFAULTS: Final[dict[str, float]] = {
    "max_restarts": 5,
    "max_seconds": 10.0,
    "backoff_initial": 0.05,
    "backoff_max": 5.0,
    # Up this long and the backoff starts over (systemd users ask for exactly this reset).
    "stable_after": 10.0,
}

_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,99}")
_MODULE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
_KNOWN: Final = frozenset(
    {
        "id", "type", "module", "command", "args", "kwargs", "capabilities",
        "restart_policy", "heartbeat_timeout", "output", "log_max_bytes", "env", "metadata",
    }
)  # fmt: skip
_DEFAULT_LOG_MAX_BYTES: Final = 1 << 20


@dataclass(frozen=True)
class RestartPolicy:
    """When an agent is restarted, how often at most, and how long to wait in between."""

    type: str = "permanent"
    max_restarts: int = 5
    max_seconds: float = 10.0
    backoff_initial: float = 0.05
    backoff_max: float = 5.0
    stable_after: float = 10.0

    @classmethod
    def from_config(cls, value: Any) -> RestartPolicy:
        """The policy of a validated config's ``restart_policy`` (a name or a dict)."""
        if isinstance(value, str):
            return cls(type=value)
        fields = {**_POLICY_DEFAULTS, **value}
        return cls(
            type=str(fields.get("type", "permanent")),
            max_restarts=int(fields["max_restarts"]),
            max_seconds=float(fields["max_seconds"]),
            backoff_initial=float(fields["backoff_initial"]),
            backoff_max=float(fields["backoff_max"]),
            stable_after=float(fields["stable_after"]),
        )

    def wants_restart(self, abnormal: bool) -> bool:
        """``permanent``: always; ``transient``: after an abnormal exit; ``temporary``: never."""
        return self.type == "permanent" or (self.type == "transient" and abnormal)


def _check_policy(value: Any, problems: list[str]) -> None:
    if isinstance(value, str):
        if value not in RESTART_TYPES:
            problems.append(f"restart_policy must be one of {', '.join(RESTART_TYPES)}")
        return
    if not isinstance(value, Mapping):
        problems.append("restart_policy must be a name or a dict")
        return
    if value.get("type", "permanent") not in RESTART_TYPES:
        problems.append(f"restart_policy.type must be one of {', '.join(RESTART_TYPES)}")
    for key in value:
        if key != "type" and key not in _POLICY_DEFAULTS:
            problems.append(f"restart_policy.{key} is not a policy field")
    for key in _POLICY_DEFAULTS:
        if key in value and not _positive_number(value[key], allow_zero=key == "max_restarts"):
            problems.append(f"restart_policy.{key} must be a number >= 0")
    if "max_restarts" in value and not isinstance(value["max_restarts"], int):
        problems.append("restart_policy.max_restarts must be an int")


def _positive_number(value: Any, *, allow_zero: bool = True) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return value >= 0 if allow_zero else value > 0


def _str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def validate_config(config: Any) -> dict[str, Any]:
    """Check ``config`` and return a normalised copy; ``InvalidAgentConfig`` lists every fault.

    Required: ``id``, ``type``, and exactly one of ``module`` (``"pkg.mod:callable"``) or
    ``command`` (an argv list). Optional: ``args``, ``kwargs``, ``capabilities``,
    ``restart_policy``, ``heartbeat_timeout`` (seconds), ``output`` (``"file"`` or
    ``"inherit"``), ``log_max_bytes``, ``env`` (extra environment), ``metadata`` (extra fields
    for the agent's live entry).
    """
    if not isinstance(config, Mapping):
        raise InvalidAgentConfig(detail=f"config must be a dict, got {type(config).__name__}")
    missing = [key for key in ("id", "type") if key not in config]
    problems: list[str] = []
    if "module" not in config and "command" not in config:
        missing.append("module or command")
    if "module" in config and "command" in config:
        problems.append("give exactly one of module and command, not both")
    unknown = sorted(str(k) for k in config if k not in _KNOWN)
    if unknown:
        problems.append(f"unknown fields {', '.join(unknown)}")
    if "id" in config and not (isinstance(config["id"], str) and _ID.fullmatch(config["id"])):
        problems.append("id must be 1-100 of A-Z a-z 0-9 _ . : @ - (not starting with punctuation)")
    if "type" in config and not (isinstance(config["type"], str) and config["type"]):
        problems.append("type must be a non-empty str")
    if "module" in config and not (
        isinstance(config["module"], str) and _MODULE.fullmatch(config["module"])
    ):
        problems.append('module must name a callable as "package.module:callable"')
    if "command" in config and not (_str_list(config["command"]) and config["command"]):
        problems.append("command must be a non-empty list of str (an argv)")
    if "args" in config and not isinstance(config["args"], (list, tuple)):
        problems.append("args must be a list")
    if "kwargs" in config and not (
        isinstance(config["kwargs"], Mapping) and all(isinstance(k, str) for k in config["kwargs"])
    ):
        problems.append("kwargs must be a dict with str keys")
    if "capabilities" in config and not _str_list(config["capabilities"]):
        problems.append("capabilities must be a list of str")
    if "restart_policy" in config:
        _check_policy(config["restart_policy"], problems)
    timeout = config.get("heartbeat_timeout")
    if timeout is not None and not _positive_number(timeout, allow_zero=False):
        problems.append("heartbeat_timeout must be a number > 0 (seconds) or None")
    if config.get("output", "file") not in ("file", "inherit"):
        problems.append('output must be "file" or "inherit"')
    size = config.get("log_max_bytes", _DEFAULT_LOG_MAX_BYTES)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1024:
        problems.append("log_max_bytes must be an int >= 1024")
    if "env" in config and not (
        isinstance(config["env"], Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in config["env"].items())
    ):
        problems.append("env must be a dict of str to str")
    if "metadata" in config and not isinstance(config["metadata"], Mapping):
        problems.append("metadata must be a dict")
    if missing or problems:
        raise InvalidAgentConfig(missing=missing, detail="; ".join(problems) or None)
    out: dict[str, Any] = {
        "id": config["id"],
        "type": config["type"],
        "args": list(config.get("args", ())),
        "kwargs": dict(config.get("kwargs", {})),
        "capabilities": list(config.get("capabilities", ())),
        "restart_policy": _normal_policy(config.get("restart_policy", "permanent")),
        "heartbeat_timeout": timeout,
        "output": config.get("output", "file"),
        "log_max_bytes": size,
        "env": dict(config.get("env", {})),
        "metadata": dict(config.get("metadata", {})),
    }
    if "module" in config:
        out["module"] = config["module"]
    else:
        out["command"] = list(config["command"])
    return out


def _normal_policy(value: Any) -> Any:
    return value if isinstance(value, str) else dict(value)
