"""Text cleaning: dump HTML and Reddit markdown to readable, normalised text."""

from __future__ import annotations


def html_to_text(html: str) -> str:
    """Stack Exchange body HTML -> readable text (code blocks, inline code, TeX, lists, link text kept)."""
    raise NotImplementedError


def clean_plain_text(text: str) -> str:
    """Reddit markdown / plain text -> normalised text (entities, CRLF, control characters, mojibake)."""
    raise NotImplementedError
