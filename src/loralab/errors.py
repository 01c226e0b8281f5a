"""Errors a user can fix. The CLI prints them without a traceback and exits with code 2."""

from __future__ import annotations

from dataclasses import dataclass


MAX_HEAD_CHARS = 300
MAX_PROBLEMS = 25  # listed in one message; the rest counted
MAX_VALUE_CHARS = 120  # a value shown in a message: enough to recognise it, never a page of text


def shorten(value: object, limit: int = MAX_VALUE_CHARS) -> str:
    """The value's repr, cut in the middle when long: a hostile or huge input stays a one-line message."""
    try:
        text = repr(value)
    except RecursionError:  # a structure that contains itself
        return "<a structure that contains itself>"
    except ValueError:  # an int beyond Python's 4300-digit str() limit
        return f"<a number of about {value.bit_length() * 3 // 10 if isinstance(value, int) else '?'} digits>"
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} … {text[-half:]}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input: where, what was given, and how to fix it."""

    where: str  # a field path ("runs.B.lora.r"), optionally with "file:line"
    message: str
    value: object = None
    fix: str = ""
    has_value: bool = True

    def __str__(self) -> str:
        where = self.where if len(self.where) <= MAX_VALUE_CHARS else self.where[:MAX_VALUE_CHARS - 1] + "…"
        text = f"{where}: {self.message}"
        if self.has_value:
            text += f" (got {shorten(self.value)})"
        if self.fix:
            text += f". Fix: {self.fix}"
        return text


class LoralabError(Exception):
    """An error in what the user asked for; shown as a message, never as a stack trace."""

    exit_code = 2

    def __init__(self, message: str, problems: list[Problem] | None = None):
        self.problems = list(problems or [])
        super().__init__(message)

    def __str__(self) -> str:
        head = super().__str__()
        if len(head) > MAX_HEAD_CHARS:  # a head may quote the input: keep the message to a screen
            head = head[:MAX_HEAD_CHARS - 1] + "…"
        if not self.problems:
            return head
        shown = self.problems[:MAX_PROBLEMS]
        lines = [head] + [f"  - {p}" for p in shown]
        if len(self.problems) > len(shown):
            lines.append(f"  - … and {len(self.problems) - len(shown)} more")
        return "\n".join(lines)


class SpecError(LoralabError):
    """The experiment file is invalid; carries every problem found, not just the first."""


class DataError(LoralabError):
    """A data set is missing, unreadable or lacks a field."""


class ModelError(LoralabError):
    """A model cannot be found or loaded, or a LoRA target matches nothing."""


class RunNotFound(LoralabError):
    """A run name or id that the workspace does not hold."""


class WorkspaceError(LoralabError):
    """The workspace cannot be written or read: disk full, read-only, a file where a folder should be,
    a database that is not loralab's. Not the input's fault, so exit code 1, as for a failed run."""

    exit_code = 1
