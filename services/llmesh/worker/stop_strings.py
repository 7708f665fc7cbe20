"""Stop strings over streamed text, for engines that detokenize themselves (llamacpp).

Text that could be the start of a stop string is held back until the next piece decides: a stream
never shows a client the first half of a stop string it then cuts.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed text pieces; get back what may be shown, and the stop string once one matches."""

    def __init__(self, stops: Sequence[str], include_stop: bool = False, hidden: Sequence[str] = ()) -> None:
        """`hidden` stops (the model's own answer ends) are never shown, whatever `include_stop` says."""
        self._stops = [s for s in (*stops, *hidden) if s]
        self._include = include_stop
        self._hidden = frozenset(hidden)
        self._held = ""

    def feed(self, piece: str) -> tuple[str, str | None]:
        """(text to show now, the stop string that ended the text or None)."""
        text = self._held + piece
        self._held = ""
        if not self._stops:
            return text, None
        found = [(at, stop) for stop in self._stops if (at := text.find(stop)) >= 0]
        if found:
            at, stop = min(found)
            shown = at + len(stop) if self._include and stop not in self._hidden else at
            return text[:shown], stop
        keep = self._longest_stop_prefix_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], None

    def flush(self) -> str:
        """At the end of generation: held text that turned out not to be a stop string."""
        held, self._held = self._held, ""
        return held

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        best = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), best, -1):
                if stop.startswith(text[-size:]):
                    best = size
                    break
        return best
