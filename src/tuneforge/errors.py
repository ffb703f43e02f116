"""User-facing errors: printed by the CLI without a traceback, exit code 2.

Each message says where (file, row, key), what was given, what was expected and how to fix it.
Several problems found in one pass are reported together, so a user fixes them all in one go.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix by changing input (config, data, model path)."""

    kind = "error"

    def __init__(self, *problems: str):
        if not problems:
            raise ValueError("UserError needs at least one problem message")
        self.problems = list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        if len(self.problems) == 1:
            return f"{self.kind}: {self.problems[0]}"
        lines = [f"{self.kind}: {len(self.problems)} problems"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class ConfigError(UserError):
    kind = "config error"


class DataError(UserError):
    kind = "data error"


class ModelError(UserError):
    kind = "model error"


class TrainingError(UserError):
    """A run that had to stop (e.g. its loss became NaN): what happened, what was kept, what to change."""

    kind = "training error"
