"""What ``shmreg`` commands accept as a registry: a NAME (shared memory) or a Redis URL.

A URL names its registry in the fragment: ``redis://db1:6379/0#jobs``. ``shmreg ls URL``
without a fragment lists the registries on that server.
"""

from __future__ import annotations

from shmreg._errors import InvalidBackendConfig
from shmreg._registry import Registry
from shmreg.backends._redis_conn import is_url


def split_target(target: str) -> tuple[str | None, str | None]:
    """``(registry name, url)``: the name alone for shared memory, both for a URL."""
    if not is_url(target):
        return target, None
    url, _, name = target.partition("#")
    return (name or None), url


def open_target(target: str) -> Registry:
    """Attach to the registry ``target`` names (see the module docstring)."""
    name, url = split_target(target)
    if name is None:
        raise InvalidBackendConfig(f"{target!r} names no registry: add it as #NAME")
    return Registry.attach(name, url=url)


def list_names(url: str) -> list[str]:
    """The registries stored at ``url``."""
    from shmreg.backends._redis_base import registry_names

    return registry_names(url)
