"""One error family for bad input: ``run.py`` prints any :class:`UserError` as one clear line on stderr.

Everything a user can get wrong (a config value, a path, a file, a request a method cannot honour)
raises a subclass of :class:`UserError` with a message that says what to do. Anything else is a bug
and is reported with its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message is the whole story, no traceback is shown."""


class ConfigError(UserError, ValueError):
    """A configuration that cannot be run; raised before any model loads."""


class LoadError(UserError):
    """A model could not be found or loaded."""


class DataError(UserError, ValueError):
    """Missing, unreadable or insufficient text."""


class RunDirError(UserError):
    """A run dir that cannot be used (occupied, unwritable, no free space)."""


class PlanError(UserError):
    """A run predicted not to fit the memory there is (``core.run.plan``); raised before any weight is read."""
