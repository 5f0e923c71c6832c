"""Turning a definition's `command` string into an argv list, as the seed does.

The seed splits commands with npm shell-quote: words are split on blanks,
quotes group, `$VAR` and `${VAR}` are replaced from the job's env (unknown
variables become empty), and a command using shell syntax (operators such as
`&&`, `|`, `>`, `;`, or globs) is passed as one single argv element — such a
command needs an explicit `sh -c '…'`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_OPERATORS = set("|&;<>()")
_GLOBS = set("*?")
_PLAIN = re.compile(r"""[^'"\\$|&;<>()*?#]*""")
"""A command with none of the characters `_Splitter` treats specially."""
_BLANKS = re.compile(r"[ \t\n]+")
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


class _ShellSyntax(Exception):
    """The command uses shell syntax and is passed whole."""


def split_command(command: str, env: Mapping[str, str]) -> list[str]:
    """The argv of `command`; raises ValueError for unbalanced quotes."""
    if _PLAIN.fullmatch(command):  # nothing but words and blanks: what most commands are
        words = command.strip(" \t\n")
        return _BLANKS.split(words) if words else []
    try:
        return _Splitter(command, env).words()
    except _ShellSyntax:
        return [command]


class _Splitter:
    def __init__(self, text: str, env: Mapping[str, str]) -> None:
        self.text, self.env, self.i = text, env, 0
        self.words_: list[str] = []
        self.word: list[str] | None = None

    def words(self) -> list[str]:
        while self.i < len(self.text):
            char = self.text[self.i]
            self.i += 1
            if char in " \t\n":
                self._end_word()
            elif char == "'":
                self._append(self._until("'"))
            elif char == '"':
                self._double_quoted()
            elif char == "\\":
                self._append(self._take_one())
            elif char == "$":
                self._append(self._variable())
            elif char in _OPERATORS or char in _GLOBS or (char == "#" and self.word is None):
                raise _ShellSyntax
            else:
                self._append(char)
        self._end_word()
        return self.words_

    def _append(self, text: str) -> None:
        self.word = (self.word or []) + [text]

    def _end_word(self) -> None:
        if self.word is not None:
            self.words_.append("".join(self.word))
            self.word = None

    def _take_one(self) -> str:
        if self.i >= len(self.text):
            return ""
        self.i += 1
        return self.text[self.i - 1]

    def _until(self, quote: str) -> str:
        end = self.text.find(quote, self.i)
        if end < 0:
            raise ValueError(f"no closing quotation ({quote}) in command {self.text!r}")
        chunk, self.i = self.text[self.i : end], end + 1
        return chunk

    def _double_quoted(self) -> None:
        parts: list[str] = []
        while True:
            if self.i >= len(self.text):
                raise ValueError(f'no closing quotation (") in command {self.text!r}')
            char = self.text[self.i]
            self.i += 1
            if char == '"':
                break
            if char == "\\" and self.i < len(self.text) and self.text[self.i] in '"\\$`':
                parts.append(self._take_one())
            elif char == "$":
                parts.append(self._variable())
            else:
                parts.append(char)
        self._append("".join(parts))

    def _variable(self) -> str:
        if self.text.startswith("{", self.i):
            end = self.text.find("}", self.i)
            if end < 0:
                raise ValueError(f"no closing brace in command {self.text!r}")
            name, self.i = self.text[self.i + 1 : end], end + 1
            return self.env.get(name, "")
        start = self.i
        while self.i < len(self.text) and self.text[self.i] in _NAME_CHARS:
            self.i += 1
        name = self.text[start : self.i]
        return self.env.get(name, "") if name else "$"
