"""Values inside Prefect artifacts, which the UI renders as Markdown: the markdown artifact,
every string cell of a table artifact and every artifact's description.

A cluster name, a reason (quoting node output, an Azure error or the operator's hotfix
reason) or a run name is text: it must not close a table cell, start a link, an image or
HTML, or turn the rest of the cell bold.
"""

from __future__ import annotations

import re

__all__ = ["markdown_text"]

# CommonMark: any ASCII punctuation character may be backslash-escaped and then stands for
# itself. Escaping all of them (not a hand-picked few) also defuses what a short list misses:
# GFM autolinks (`www.`, `https://`, `a@b.c`), entities (`&lt;`), `~~strikethrough~~`, and a
# `|` inside a table cell (GFM reads `\|` as a literal bar there).
_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")
# A line break would end the table row or the paragraph the value sits in.
_LINE_BREAKS = re.compile(r"(?:\r\n|[\n\r\x0b\x0c\x85\u2028\u2029])+")
# C0/C1 controls, bidi overrides and zero-width characters: invisible, or reorder what is shown.
_CONTROL = re.compile(
    r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064"
    r"\u2066-\u2069\ufeff]"
)


def markdown_text(value: object) -> str:
    """``value`` as literal text inside Markdown: punctuation backslash-escaped, line breaks
    (and tabs) as one space, other control, bidi and zero-width characters as U+FFFD."""
    text = _LINE_BREAKS.sub(" ", str(value)).replace("\t", " ")
    return _PUNCTUATION.sub(r"\\\1", _CONTROL.sub("\ufffd", text))
