"""Text cleaning: dump HTML and Reddit markdown to readable, normalised text.

``html_to_text`` renders Stack Exchange post bodies (the HTML that the site
stores, once the XML parser has decoded the attribute) as Markdown-flavoured
plain text: fenced code blocks, backticked inline code, ``-``/``1.`` lists,
``>`` quotes, ``#`` headings, link text without URLs.  It parses with lxml's
libxml2 HTML parser (lenient: unclosed tags, stray ``<`` and the like never
raise) and walks the tree once, so whitespace is normalised per paragraph and
code blocks are never touched by it. Well-formed bodies of the common shapes
(paragraphs, code blocks, lists, quotes, headings, divs, tables, inline tags) are
rendered with the same rules by a C extension, ``_fasthtml``, in one pass over the
string and without libxml2's tree (11x faster on generated bodies, 7.8x on the
fixtures' real ones, of which 2 in 796 take the slow path); it returns None for
anything else, which goes through libxml2. tests/test_clean_fast_path.py holds the two to the same text.

``clean_plain_text`` normalises Reddit comment bodies, which are already
Markdown: entities, line endings, control characters, UTF-8-read-as-cp1252
mojibake, blank-line runs and trailing spaces.
"""

from __future__ import annotations

import html as _html
import re
import threading

from lxml import etree

__all__ = ["clean_plain_text", "html_to_text"]


# --------------------------------------------------------------------------
# HTML -> text
# --------------------------------------------------------------------------

# Elements that start a new block.  Everything not listed here (and not
# handled specially) is treated as inline and contributes its text.
_BLOCK_TAGS = frozenset(
    {
        "address", "article", "aside", "blockquote", "body", "caption", "center",
        "dd", "details", "dialog", "dir", "div", "dl", "dt", "fieldset",
        "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5",
        "h6", "head", "header", "hgroup", "hr", "html", "legend", "li", "listing",
        "main", "menu", "nav", "ol", "p", "plaintext", "pre", "section", "summary",
        "table", "tbody", "td", "tfoot", "th", "thead", "title", "tr", "ul", "xmp",
    }
)
_HEADINGS = {"h1": "# ", "h2": "## ", "h3": "### ", "h4": "#### ", "h5": "##### ", "h6": "###### "}
_PRE_TAGS = frozenset({"pre", "listing", "xmp", "plaintext"})
_LIST_TAGS = frozenset({"ul", "ol", "dir", "menu"})
_DROP_TAGS = frozenset({"script", "style", "template", "noscript", "object", "embed", "iframe"})

# Marker for <br> inside a paragraph; NUL cannot survive parsing (libxml2
# turns it into U+FFFD), so it never collides with text.
_BR = "\x00"
# HTML whitespace plus NBSP (``&nbsp;`` is rendered as a normal space).
_WS_RUN = re.compile("[ \t\n\r\f\xa0]+")
_BR_SPACES = re.compile(" ?\x00 ?")
# Characters str.split() treats as whitespace that HTML does not collapse
# (and that must therefore survive, e.g. U+2009 THIN SPACE, U+3000).
_OTHER_SPACE = re.compile("[\x0b\x1c-\x1f\x85\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")
_MANY_NEWLINES = re.compile("\n{3,}")

try:  # the common shapes of a body rendered in C, without libxml2 (tasks/ingest/_fasthtml.c); None: built without
    from ._fasthtml import render as _fast_render
    from ._fasthtml import render_utf8 as _render_utf8
except ImportError:  # pragma: no cover - an install without a C compiler
    _fast_render = _render_utf8 = None


def c_renderer() -> object | None:
    """The renderer :func:`html_to_text` tries first, as the capsule C readers call on a body's UTF-8 bytes
    (tasks/ingest/_fastposts.c), or None where html_to_text does not use it."""
    return _render_utf8 if _fast_render is not None else None

_PARSER_OPTIONS = dict(recover=True, no_network=True, remove_comments=True, remove_pis=True)
# One parser per thread: its error_log is read after each parse.
_LOCAL = threading.local()
_TAG = re.compile(r"<[^<>]*>")


class _ListBlock(str):
    """A rendered list; inside list items it attaches to the previous line without a blank line."""

    __slots__ = ()


def _flush(inline: list[str], blocks: list[str]) -> None:
    """Turn the pending inline pieces into one normalised paragraph block."""
    if not inline:
        return
    text = "".join(inline)
    inline.clear()
    if _OTHER_SPACE.search(text) is None:
        # Fast path: str.split() splits on exactly the HTML whitespace + NBSP here.
        text = " ".join(text.split())
        if not text:
            return
    else:
        text = _WS_RUN.sub(" ", text)
    if _BR in text:
        text = _BR_SPACES.sub("\n", text)
        text = _MANY_NEWLINES.sub("\n\n", text.strip("\n "))
    else:
        text = text.strip(" ")
    if text:
        blocks.append(text)


def _code_text(el) -> str:
    """All text under ``el`` exactly as written; ``<br>`` counts as a newline."""
    if len(el) == 0:
        return el.text or ""
    parts = [el.text or ""]
    for child in el:
        tag = child.tag
        if tag == "br":
            parts.append("\n")
        elif isinstance(tag, str):
            parts.append(_code_text(child))
        if child.tail:
            parts.append(child.tail)
    return "".join(parts)


def _inline_code(text: str) -> str:
    text = _WS_RUN.sub(" ", text)
    if not text.strip(" "):
        return text
    if "`" not in text:
        return "`" + text + "`"
    # Markdown rule: a fence longer than any backtick run inside, padded.
    longest = max(len(run) for run in re.findall("`+", text))
    fence = "`" * (longest + 1)
    return f"{fence} {text} {fence}"


def _blocks(el) -> list[str]:
    """Render the content of ``el`` (text and children) as a list of blocks."""
    blocks: list[str] = []
    text = el.text
    inline: list[str] = [text] if text else []
    if len(el):
        _children(el, inline, blocks)
    if inline:
        _flush(inline, blocks)
    return blocks


def _children(el, inline: list[str], blocks: list[str]) -> None:
    for child in el:
        tag = child.tag
        if tag.__class__ is str:  # not a comment or processing instruction (their tag is a function)
            if tag in _BLOCK_TAGS:
                if inline:
                    _flush(inline, blocks)
                if tag == "p":  # the most common block: _block's last case, without its tests
                    blocks.extend(_blocks(child))
                else:
                    _block(child, tag, blocks)
            else:
                _inline(child, tag, inline, blocks)
        tail = child.tail
        if tail:
            inline.append(tail)


def _inline(el, tag: str, inline: list[str], blocks: list[str]) -> None:
    if tag == "br":
        inline.append(_BR)
    elif tag == "code" or tag == "tt" or tag == "samp":
        inline.append(_inline_code(_code_text(el)))
    elif tag == "img":
        alt = el.get("alt")
        if alt:
            inline.append(alt)
    elif tag in _DROP_TAGS:
        pass
    else:  # a, strong, em, b, i, sup, sub, strike, s, kbd, span, unknown ...
        if el.text:
            inline.append(el.text)
        if len(el):
            _children(el, inline, blocks)


def _prefix_lines(text: str, first: str, rest: str) -> str:
    """Prefix the first line with ``first`` and later non-empty lines with ``rest``."""
    lines = text.split("\n")
    out = [first + lines[0] if lines[0] else first.rstrip(" ")]
    bare_rest = rest.rstrip(" ")
    for line in lines[1:]:
        out.append(rest + line if line else bare_rest)
    return "\n".join(out)


def _join_item(sub: list[str]) -> str:
    """Blocks of one list item: nested lists hug the line above, paragraphs get a blank line."""
    parts = [sub[0]]
    for block in sub[1:]:
        parts.append("\n" if isinstance(block, _ListBlock) else "\n\n")
        parts.append(block)
    return "".join(parts)


def _list(el, tag: str) -> str:
    ordered = tag == "ol"
    number = 1
    if ordered:
        start = el.get("start")
        if start:
            try:
                number = int(start.strip())
            except ValueError:
                number = 1
    items: list[str] = []
    stray: list[str] = []  # text directly inside <ul>, outside any <li>
    if el.text and el.text.strip():
        stray.append(el.text)
    for child in el:
        tag_c = child.tag
        if isinstance(tag_c, str):
            if tag_c == "li":
                if stray:
                    _stray_item(stray, items)
                sub = _blocks(child)
                marker = f"{number}. " if ordered else "- "
                number += 1
                items.append(_prefix_lines(_join_item(sub), marker, "  ") if sub else marker.rstrip(" "))
            elif tag_c not in _DROP_TAGS:
                # e.g. <ul><li>a</li><ul><li>b</li></ul></ul>: a nested list
                # without its <li>; render it indented under the item above.
                if stray:
                    _stray_item(stray, items)
                sub: list[str] = []
                if tag_c in _BLOCK_TAGS:
                    _block(child, tag_c, sub)
                else:
                    inl: list[str] = []
                    _inline(child, tag_c, inl, sub)
                    _flush(inl, sub)
                if sub:
                    items.append(_prefix_lines(_join_item(sub), "  ", "  "))
        if child.tail and child.tail.strip():
            stray.append(child.tail)
    if stray:
        _stray_item(stray, items)
    return _ListBlock("\n".join(items))


def _stray_item(stray: list[str], items: list[str]) -> None:
    sub: list[str] = []
    _flush(stray, sub)
    if sub:
        items.append(_prefix_lines(sub[0], "  ", "  "))


def _table(el) -> str:
    rows: list[str] = []
    for tr in el.iter("tr"):
        cells = []
        for cell in tr:
            if cell.tag == "td" or cell.tag == "th":
                cells.append(" ".join(b.replace("\n", " ") for b in _blocks(cell)))
        if any(cells):
            rows.append(" | ".join(cells).strip(" "))
    return "\n".join(rows)


def _block(el, tag: str, blocks: list[str]) -> None:
    if tag in _PRE_TAGS:
        code = _code_text(el)
        if code.startswith("\n"):  # HTML drops one newline right after <pre>
            code = code[1:]
        code = code.replace("\xa0", " ").rstrip("\n")
        blocks.append("```\n" + code + "\n```" if code else "```\n```")
    elif tag in _LIST_TAGS:
        rendered = _list(el, tag)
        if rendered:
            blocks.append(rendered)
    elif tag == "blockquote":
        sub = _blocks(el)
        if sub:
            blocks.append(_prefix_lines("\n\n".join(sub), "> ", "> "))
    elif tag in _HEADINGS:
        sub = _blocks(el)
        if sub:
            blocks.append(_HEADINGS[tag] + " ".join(b.replace("\n", " ") for b in sub))
    elif tag == "hr":
        blocks.append("---")
    elif tag == "table":
        rendered = _table(el)
        if rendered:
            blocks.append(rendered)
    elif tag == "head":
        for child in el:
            if child.tag == "title":
                blocks.extend(_blocks(child))
    else:  # p, div, li outside a list, td outside a table, section, ...
        blocks.extend(_blocks(el))


def _parser(utf8_bytes: bool = False) -> etree.HTMLParser:
    name = "bytes_parser" if utf8_bytes else "parser"
    parser = getattr(_LOCAL, name, None)
    if parser is None:
        parser = etree.HTMLParser(encoding="utf-8" if utf8_bytes else None, **_PARSER_OPTIONS)
        setattr(_LOCAL, name, parser)
    return parser


def _parse(html: str):
    parser = _parser()
    try:
        root = etree.fromstring(html, parser)
    except ValueError:
        # A str carrying an XML encoding declaration: lxml wants bytes.
        parser = _parser(utf8_bytes=True)
        root = etree.fromstring(html.encode("utf-8", "surrogatepass"), parser)
    for error in parser.error_log:
        if error.type == etree.ErrorTypes.ERR_RESOURCE_LIMIT:
            # libxml2 stops building the tree past 256 nested elements and
            # drops the rest of the text; the caller falls back to stripping tags.
            return None
    return root


def _strip_tags(html: str) -> str:
    """Last-resort rendering: every tag removed, entities decoded, one paragraph."""
    blocks: list[str] = []
    _flush([_html.unescape(_TAG.sub(" ", html.replace(_BR, "")))], blocks)
    return blocks[0] if blocks else ""


# Why not markdownify or html2text (bench/clean/compare.py, measured on the fixtures' 801 post bodies):
# with either in place of this function tests/test_clean.py fails 29 (markdownify) or 39 (html2text) of its
# 87 tests (link URLs kept, code fences and list/quote layout differ, whitespace inside code touched), and
# they take 15.7x and 7.5x this function's time. A library would change what the datasets contain and
# slow ingest, so this renderer stays.
def html_to_text(html: str) -> str:
    """Stack Exchange body HTML -> readable text (code blocks, inline code, TeX, lists, link text kept)."""
    if not html or html.isspace():
        return ""
    if _fast_render is not None:
        text = _fast_render(html)
        if text is not None:
            return text
    return _render_with_libxml2(html)


def _render_with_libxml2(html: str) -> str:
    try:
        root = _parse(html)
    except (etree.LxmlError, ValueError):
        return _strip_tags(html)
    if root is None:
        return _strip_tags(html)
    try:
        return "\n\n".join(_blocks(root)).strip()
    except RecursionError:
        # Very deep (but parseable) nesting; never raise on hostile input.
        blocks: list[str] = []
        _flush(list(root.itertext()), blocks)
        return blocks[0] if blocks else ""


# --------------------------------------------------------------------------
# Reddit / plain text
# --------------------------------------------------------------------------

# Named or numeric character references, with their semicolon (bare "&copy"
# or "&not" in prose must stay as typed).  One pass: "&amp;gt;" -> "&gt;".
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
# C0 controls except \t and \n, DEL, C1 controls.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TRAILING_SPACE = re.compile("[ \t]+$", re.MULTILINE)

# cp1252 decodes 0x80-0x9f to these characters; latin-1 to the C1 controls
# (the five bytes cp1252 leaves undefined only ever appear that way).
_CP1252_HIGH = bytes(range(0x80, 0xA0)).decode("cp1252", errors="ignore")
_TO_LATIN1 = {ord(ch): ch.encode("cp1252").decode("latin-1") for ch in _CP1252_HIGH}
_CONT = "[\x80-\xbf" + re.escape(_CP1252_HIGH) + "]"  # a UTF-8 continuation byte
_MOJIBAKE = re.compile(
    "(?:[\xc2-\xdf]" + _CONT + "|[\xe0-\xef]" + _CONT + "{2}|[\xf0-\xf4]" + _CONT + "{3})+"
)


def _plausible(ch: str) -> bool:
    """Would a real text contain this character, so that a repair producing it is believable?

    Two-byte UTF-8 read as cp1252 looks like an accented capital (or ß) then
    punctuation, which genuine text also has ("CAFÉ…", "Straße“").  Those
    decode to IPA, combining marks, Syriac, NKo...: reject such targets and
    keep the scripts that real mojibake comes from.
    """
    cp = ord(ch)
    if cp < 0xA0:
        return False  # C1 control
    if cp < 0x0800:
        return (
            cp < 0x0240  # Latin-1 supplement, Latin Extended-A/B
            or 0x0384 <= cp < 0x0530  # Greek (not the rare 0370-0383 signs), Cyrillic
            or 0x05D0 <= cp < 0x05F0  # Hebrew letters
            or 0x0600 <= cp < 0x0700  # Arabic
        )
    return True  # three- and four-byte sequences are very unlikely by accident


def _fix_run(match: re.Match) -> str:
    run = match.group()
    try:
        raw = run.translate(_TO_LATIN1).encode("latin-1")
        fixed = raw.decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return run
    if fixed.encode("utf-8") != raw or not all(_plausible(ch) for ch in fixed):
        return run
    return fixed


# Why not ftfy.fix_encoding (bench/clean/compare.py): it restores about as many broken fixture texts
# (782 vs 780 of 801), takes 2.1x the time, and fails one test of tests/test_clean.py: it turns a stray
# C1 control (U+0085) into an ellipsis where this cleaning removes control characters. No new dependency
# for that; this repair stays.
def _fix_mojibake(text: str) -> str:
    for _ in range(3):  # doubly encoded text needs a second pass
        fixed = _MOJIBAKE.sub(_fix_run, text)
        if fixed == text:
            break
        text = fixed
    return text


def clean_plain_text(text: str) -> str:
    """Reddit markdown / plain text -> normalised text (entities, CRLF, control characters, mojibake)."""
    if not text:
        return ""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "&" in text:
        text = _ENTITY.sub(lambda m: _html.unescape(m.group()), text)
    if not text.isascii():
        text = _fix_mojibake(text)
    text = _CONTROL.sub("", text)
    # Each rule's regex scan costs more than the string search that says whether it can match (a comment:
    # 3.5 and 2.0 us against 0.6 and 0.3). Spaces at the very end need no rule: strip() removes them.
    if " \n" in text or "\t\n" in text:
        text = _TRAILING_SPACE.sub("", text)
    if "\n\n\n" in text:
        text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()
