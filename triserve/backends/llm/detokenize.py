"""Generated tokens to the text a client sees, piece by piece.

Decoding each token on its own is wrong twice over: a Chinese character is
often split across byte-level tokens (alone, each decodes to U+FFFD), and
SentencePiece/BPE tokenizers decide a word's leading space from its
neighbours. So, as vLLM and TGI do, we decode a short window of recent tokens
twice (with and without the new ones) and emit only the difference, holding
it back while it ends in U+FFFD.
"""

from __future__ import annotations

from typing import Any, Sequence

# Prompt tokens kept as left context, so that the first reply token decodes
# with the spacing it has after the prompt.
_CONTEXT_TOKENS = 5
_REPLACEMENT_CHARACTER = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text that only ever grows by whole characters."""

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int]):
        self._tokenizer = tokenizer
        self._token_ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # window start: context for the tokens being read
        self._read_offset = len(self._token_ids)  # tokens before this are already emitted

    def add(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the new text that is complete (may be "")."""
        self._token_ids.extend(token_ids)
        prefix_text, full_text = self._window_texts()
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHARACTER):
            return ""  # nothing yet, or a character still missing its last bytes
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        return full_text[len(prefix_text):]

    def flush(self) -> str:
        """At the end of generation: whatever was held back, broken bytes shown as U+FFFD."""
        prefix_text, full_text = self._window_texts()
        self._prefix_offset = self._read_offset = len(self._token_ids)
        return full_text[len(prefix_text):]

    def _window_texts(self) -> tuple[str, str]:
        window = self._token_ids[self._prefix_offset:]
        read = self._read_offset - self._prefix_offset
        decode = self._tokenizer.decode
        return (decode(window[:read], skip_special_tokens=True),
                decode(window, skip_special_tokens=True))


class ReplyText:
    """The reply as sent: whole characters, ending before the first stop string.

    While streaming, text that might be the start of a stop string is held
    back until the next tokens show whether it is, so no part of a stop
    string ever reaches the client.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], stop: Sequence[str] = ()):
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self._stop = tuple(stop)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self.text = ""  # the reply so far (cut at a stop string once one appears)
        self.stopped = False  # a stop string ended the reply
        self._sent = 0  # characters of ``text`` already handed out

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated tokens; return the text now safe to send (may be "")."""
        if not self.stopped:
            self._append(self._detokenizer.add(token_ids))
        end = len(self.text) if self.stopped else len(self.text) - self._possible_stop_start()
        return self._take(end)

    def finish(self) -> str:
        """Generation ended: the rest of the reply."""
        if not self.stopped:
            self._append(self._detokenizer.flush())
        return self._take(len(self.text))

    def _append(self, piece: str) -> None:
        search_from = max(0, len(self.text) - self._longest_stop + 1)
        self.text += piece
        found = [i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0]
        if found:
            self.text = self.text[:min(found)]
            self.stopped = True

    def _possible_stop_start(self) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        for length in range(min(self._longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-length:]
            if any(s.startswith(tail) for s in self._stop):
                return length
        return 0

    def _take(self, end: int) -> str:
        piece = self.text[self._sent:end] if end > self._sent else ""
        self._sent += len(piece)
        return piece
