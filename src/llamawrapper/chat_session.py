"""The interactive chat loop behind ``llamawrapper chat``: multi-turn history, streaming output,
``/reset`` and ``/exit``, and Ctrl-C that stops the current answer but keeps the session."""

from __future__ import annotations

import sys
from typing import Any, Optional, TextIO

from .errors import LlamaWrapperError

HELP = "Type a message. /reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer."


class ChatSession:
    def __init__(self, llm: Any, system: Optional[str] = None, sampling: Optional[dict] = None,
                 stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
        self.llm, self.system, self.sampling = llm, system, dict(sampling or {})
        self.stdin, self.stdout = stdin, stdout
        self.history: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def _write(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def _read(self) -> Optional[str]:
        self._write(">>> ")
        line = self.stdin.readline()
        return None if line == "" else line.rstrip("\n")

    def loop(self) -> None:
        self._write(f"Chatting with {self.llm.name}. {HELP}\n")
        while True:
            try:
                line = self._read()
            except KeyboardInterrupt:
                self._write("\n")
                continue
            if line is None or line.strip() in ("/exit", "/quit", "/bye"):
                self._write("\n" if line is None else "")
                return
            if not line.strip():
                continue
            if line.strip() == "/reset":
                self.reset()
                self._write("(conversation cleared)\n")
                continue
            if line.strip().startswith("/"):
                self._write(f"unknown command {line.strip()!r}. {HELP}\n")
                continue
            self.turn(line)

    def turn(self, text: str) -> str:
        """Send one user message, stream the answer, and keep both in the history."""
        self.history.append({"role": "user", "content": text})
        parts: list[str] = []
        stream = self.llm.stream(self.history, truncate="oldest", **self.sampling)
        try:
            for event in stream:
                parts.append(event.text)
                self._write(event.text)
        except KeyboardInterrupt:
            stream.close()  # cancels the generation in the engine
            self._write(" [stopped]")
        except LlamaWrapperError as exc:
            self.history.pop()
            self._write(f"\nerror: {exc}\n")
            return ""
        self._write("\n")
        answer = "".join(parts)
        self.history.append({"role": "assistant", "content": answer})
        return answer
