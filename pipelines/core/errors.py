"""User-facing errors: one line that names what to fix.

:func:`pipelines.launch.cli.run_cli` turns a :class:`UserError` into ``error: <message>`` and exit
status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; ``key`` names the config key (or path) to change."""

    def __init__(self, message: str, key: str | None = None):
        self.message, self.key = message, key   # the message without "(fix: key)", to rephrase
        super().__init__(f"{message} (fix: {key})" if key else message)


def require(condition: bool, message: str, key: str | None = None) -> None:
    """Raise :class:`UserError` unless ``condition`` holds."""
    if not condition:
        raise UserError(message, key)
