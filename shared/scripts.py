"""The Lua scripts in ``shared/lua/``, loaded once per client.

Each script opens with a comment that documents every key it touches.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from redis.commands.core import Script


@cache
def source(name: str) -> str:
    return resources.files("shared").joinpath("lua", f"{name}.lua").read_text()


def register(client: Any, name: str) -> Script:
    """A callable script bound to ``client`` (sync, asyncio or cluster; EVALSHA with reload)."""
    script: Script = client.register_script(source(name))
    return script
