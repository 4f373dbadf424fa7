"""The status line `paca bench` keeps on stderr while it measures."""

from __future__ import annotations

import sys


class Progress:
    """One dense status line on stderr: rewritten in place on a terminal, one line per update otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.width = 0

    def update(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and self.width:
            self.stream.write("\n")
            self.width = 0
