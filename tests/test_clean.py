"""Unit tests for alignflow.tasks.ingest.clean (HTML bodies and Reddit text)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from lxml import etree

from alignflow.tasks.ingest import clean
from alignflow.tasks.ingest.clean import clean_plain_text, html_to_text

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "stackexchange" / "datascience.meta-2024"


@pytest.fixture(autouse=True, params=["as installed", "libxml2 only"])
def renderer(request, monkeypatch):
    """Every test twice: as installed (the C fast path where it applies) and as without a C compiler."""
    if request.param == "libxml2 only":
        monkeypatch.setattr(clean, "_fast_render", None)
    return request.param


# ---------------------------------------------------------------------------
# html_to_text: one rule per test, exact strings
# ---------------------------------------------------------------------------


def test_inline_code_in_backticks_and_entities_decoded() -> None:
    assert html_to_text("<p>Use <code>x &amp;&amp; y</code></p>") == "Use `x && y`"


def test_inline_code_containing_backtick_gets_longer_fence() -> None:
    assert html_to_text("<p>a <code>x`y</code> b</p>") == "a `` x`y `` b"


def test_pre_code_block_fenced_with_whitespace_preserved() -> None:
    html = (
        "<p>Intro:</p>\n"
        "<pre><code>def f(x):\n    return  x &lt; 1\n\n\n\tdone  \n</code></pre>\n"
        "<p>After</p>"
    )
    assert html_to_text(html) == (
        "Intro:\n\n```\ndef f(x):\n    return  x < 1\n\n\n\tdone  \n```\n\nAfter"
    )


def test_bare_pre_is_a_code_block_and_drops_newline_after_start_tag() -> None:
    assert html_to_text("<pre>\nfoo\n  bar\n\n</pre>") == "```\nfoo\n  bar\n```"


def test_code_block_keeps_markup_text_and_br() -> None:
    assert html_to_text("<pre><code>a <b>b</b><br>c</code></pre>") == "```\na b\nc\n```"


def test_tex_untouched() -> None:
    html = r"<p>Inline $\sqrt{2}$, display $$\sum_i x_i^2$$ and \(a+b\) or \[c\]</p>"
    assert html_to_text(html) == r"Inline $\sqrt{2}$, display $$\sum_i x_i^2$$ and \(a+b\) or \[c\]"


def test_unordered_list() -> None:
    assert html_to_text("<ul>\n<li>one</li>\n<li>two <em>2</em></li>\n</ul>") == "- one\n- two 2"


def test_ordered_list_numbers_items() -> None:
    assert html_to_text("<ol><li>a</li><li>b</li><li>c</li></ol>") == "1. a\n2. b\n3. c"


def test_ordered_list_honours_start_attribute() -> None:
    assert html_to_text('<ol start="3"><li>x</li><li>y</li></ol>') == "3. x\n4. y"


def test_nested_lists_indented_two_spaces() -> None:
    html = "<ul><li>a<ul><li>b<ol><li>c</li></ol></li></ul></li><li>d</li></ul>"
    assert html_to_text(html) == "- a\n  - b\n    1. c\n- d"


def test_list_nested_without_li_is_still_indented() -> None:
    assert html_to_text("<ul><li>a</li><ul><li>b</li></ul></ul>") == "- a\n  - b"


def test_loose_list_item_paragraphs() -> None:
    html = "<ol><li><p>first</p></li><li><p>second</p><p>more</p></li></ol>"
    assert html_to_text(html) == "1. first\n2. second\n\n  more"


def test_list_between_paragraphs() -> None:
    assert html_to_text("<p>Before:</p><ul><li>x</li></ul><p>After</p>") == "Before:\n\n- x\n\nAfter"


def test_link_text_only_and_url_dropped() -> None:
    html = '<p>See <a href="https://example.com/q/1" rel="nofollow">this answer</a>.</p>'
    assert html_to_text(html) == "See this answer."


def test_img_becomes_alt_text_or_nothing() -> None:
    html = '<p>A <img src="a.png" alt="diagram"> and <img src="b.png"> end</p>'
    assert html_to_text(html) == "A diagram and end"


def test_blockquote_lines_prefixed() -> None:
    html = "<blockquote>\n  <p>first</p>\n  <p>second<br>line</p>\n</blockquote><p>after</p>"
    assert html_to_text(html) == "> first\n>\n> second\n> line\n\nafter"


def test_nested_blockquote() -> None:
    assert html_to_text("<blockquote><p>a</p><blockquote><p>b</p></blockquote></blockquote>") == "> a\n>\n> > b"


def test_code_block_inside_blockquote_keeps_code_lines() -> None:
    html = "<blockquote><pre><code>x = 1\n\n  y</code></pre></blockquote>"
    assert html_to_text(html) == "> ```\n> x = 1\n>\n>   y\n> ```"


@pytest.mark.parametrize("level", range(1, 7))
def test_headings_one_hash_per_level(level: int) -> None:
    html = f"<h{level}>Title <em>here</em></h{level}><p>body</p>"
    assert html_to_text(html) == "#" * level + " Title here\n\nbody"


def test_br_is_newline_and_hr_is_rule() -> None:
    assert html_to_text("<p>a<br>b<br/>c</p><hr><p>d</p>") == "a\nb\nc\n\n---\n\nd"


def test_paragraphs_and_divs_are_blocks() -> None:
    assert html_to_text("<p>a</p><p>b</p><div>c</div>d") == "a\n\nb\n\nc\n\nd"


def test_inline_formatting_keeps_text() -> None:
    html = "<p><strong>S</strong> <em>E</em> <b>B</b> <i>I</i> x<sup>2</sup> H<sub>2</sub>O <strike>no</strike> <kbd>Ctrl</kbd></p>"
    assert html_to_text(html) == "S E B I x2 H2O no Ctrl"


def test_entities_unescaped_and_nbsp_is_space() -> None:
    assert html_to_text("<p>a &lt; b &gt; c &amp; d &#39;q&#39; &quot;r&quot; e&nbsp;f</p>") == "a < b > c & d 'q' \"r\" e f"


def test_whitespace_collapsed_outside_code() -> None:
    html = "<p>  many   spaces\t\tand\n\nnewlines&nbsp;&nbsp; here  </p>"
    assert html_to_text(html) == "many spaces and newlines here"


def test_no_trailing_spaces_and_at_most_one_blank_line() -> None:
    html = "<p>a  <br>  b<br><br><br><br>c </p>\n\n\n<p></p><div> </div><p>d</p>"
    assert html_to_text(html) == "a\nb\n\nc\n\nd"


def test_unicode_spaces_other_than_nbsp_are_kept() -> None:
    assert html_to_text("<p>10\u2009000 and \u3000x</p>") == "10\u2009000 and \u3000x"


def test_table_rows_become_lines() -> None:
    html = "<table><thead><tr><th>A</th><th>B</th></tr></thead><tbody><tr><td>1</td><td><em>2</em></td></tr></tbody></table>"
    assert html_to_text(html) == "A | B\n1 | 2"


def test_comments_and_scripts_dropped() -> None:
    assert html_to_text("<p>a<!-- hidden --></p><script>alert(1)</script><p>b</p>") == "a\n\nb"


@pytest.mark.parametrize("html", ["", " ", "\n\t  \n", "<p></p>", "<p> </p><div>\n</div>"])
def test_empty_input_gives_empty_string(html: str) -> None:
    assert html_to_text(html) == ""


@pytest.mark.parametrize(
    ("html", "expected"),
    [
        ("<p>unclosed <b>bold <i>italic", "unclosed bold italic"),
        ("a < b and c > d", "a < b and c > d"),
        ("<", "<"),
        ("<p>a</div></span>b</p>", "ab"),
        ("<ul><li>one<li>two</ul>", "- one\n- two"),
        ("<pre><code>never closed\n  indent", "```\nnever closed\n  indent\n```"),
        ("<?xml version='1.0' encoding='utf-8'?><p>x</p>", "x"),
        ("plain text only", "plain text only"),
    ],
)
def test_malformed_html_best_effort(html: str, expected: str) -> None:
    assert html_to_text(html) == expected


def test_nesting_beyond_parser_limit_falls_back_to_text() -> None:
    # libxml2 drops text nested deeper than 256 elements; we strip tags instead.
    html = "<div><blockquote>" * 3000 + "deep &amp; x" + "</blockquote></div>" * 3000
    assert html_to_text(html) == "deep & x"


def test_deep_nesting_within_parser_limit() -> None:
    assert html_to_text("<blockquote>" * 200 + "deep" + "</blockquote>" * 200) == "> " * 199 + "> deep"
    assert html_to_text("<ul><li>" * 120 + "x" + "</li></ul>" * 120).endswith("- x")


# ---------------------------------------------------------------------------
# html_to_text on real Stack Exchange bodies
# ---------------------------------------------------------------------------


def _fixture_bodies() -> dict[str, str]:
    posts = FIXTURE_DIR / "Posts.xml"
    assert posts.is_file(), f"Stack Exchange fixture missing from the repository: {posts}"
    bodies: dict[str, str] = {}
    for _, row in etree.iterparse(str(posts), tag="row"):
        body = row.get("Body")
        if body is not None:
            bodies[row.get("Id")] = body
        row.clear()
    return bodies


@pytest.fixture(scope="module")
def real_bodies() -> dict[str, str]:
    bodies = _fixture_bodies()
    assert len(bodies) > 100
    return bodies


_FENCE_LINE = re.compile(r"^[ >]*```$")


def _prose_lines(text: str) -> list[str]:
    """Lines outside fenced code blocks (fences may sit in lists or quotes); each block becomes "CODE"."""
    out, in_code = [], False
    for line in text.split("\n"):
        if _FENCE_LINE.match(line):
            in_code = not in_code
            if in_code:
                out.append("CODE")
            continue
        if not in_code:
            out.append(line)
    return out


def test_real_id6_keeps_tex(real_bodies: dict[str, str]) -> None:
    assert html_to_text(real_bodies["6"]) == (
        "Like on math.stackexchange, where (for example) I can type `$\\sqrt{2}$` for square root of 2?\n\n"
        "If we want to be able to quote equations from data science research papers, this seems pretty essential."
    )


def test_real_bodies_have_no_markup_left(real_bodies: dict[str, str]) -> None:
    for post_id, body in real_bodies.items():
        text = html_to_text(body)
        assert "<p>" not in text, post_id
        assert "</p>" not in text, post_id
        assert "&amp;" not in text, post_id
        assert "&quot;" not in text, post_id
        if "<p>" in body:
            assert text, post_id


def test_real_bodies_whitespace_normalised(real_bodies: dict[str, str]) -> None:
    for post_id, body in real_bodies.items():
        text = html_to_text(body)
        assert text == text.strip(), post_id
        prose = _prose_lines(text)
        assert not any(line != line.rstrip(" \t") for line in prose), post_id
        assert "\n\n\n" not in "\n".join(prose), post_id
        assert not any("  " in line.lstrip(" >-0123456789.") for line in prose), post_id


def test_real_pre_blocks_are_fenced(real_bodies: dict[str, str]) -> None:
    with_pre = {k: v for k, v in real_bodies.items() if "<pre" in v}
    assert with_pre, "fixture should contain code blocks"
    for post_id, body in with_pre.items():
        text = html_to_text(body)
        fences = sum(1 for line in text.split("\n") if _FENCE_LINE.match(line))
        assert fences >= 2 * body.count("<pre"), post_id
        assert fences % 2 == 0, post_id


def test_real_top_level_code_kept_verbatim(real_bodies: dict[str, str]) -> None:
    checked = 0
    for post_id, body in real_bodies.items():
        if "<pre" not in body:
            continue
        root = etree.fromstring(body, etree.HTMLParser())
        text = html_to_text(body)
        for pre in root.findall("body/pre"):
            code = "".join(pre.itertext()).rstrip("\n")
            assert "```\n" + code + "\n```" in text, post_id
            checked += 1
    assert checked > 0


def test_real_lists_and_quotes_rendered(real_bodies: dict[str, str]) -> None:
    ul = next(v for v in real_bodies.values() if "<ul>" in v)
    assert re.search(r"^- \S", html_to_text(ul), re.MULTILINE)
    ol = next(v for v in real_bodies.values() if "<ol>" in v)
    assert re.search(r"^1\. \S", html_to_text(ol), re.MULTILINE)
    quote = next(v for v in real_bodies.values() if "<blockquote>" in v)
    assert re.search(r"^> \S", html_to_text(quote), re.MULTILINE)


# ---------------------------------------------------------------------------
# clean_plain_text
# ---------------------------------------------------------------------------


def _mojibake(text: str) -> str:
    """UTF-8 bytes read as cp1252 (bytes cp1252 leaves undefined read as latin-1)."""
    return "".join(bytes([b]).decode("cp1252", errors="ignore") or chr(b) for b in text.encode("utf-8"))


def test_plain_entities_unescaped_once() -> None:
    assert clean_plain_text("&gt; quoted &amp; &lt;b&gt; &#39;x&#39; &#x27;y&#x27;") == "> quoted & <b> 'x' 'y'"


def test_plain_double_escape_is_unescaped_only_once() -> None:
    assert clean_plain_text("&amp;gt; stays") == "&gt; stays"


def test_plain_bare_ampersand_words_not_treated_as_entities() -> None:
    assert clean_plain_text("AT&T &notation &copy 5 & 6") == "AT&T &notation &copy 5 & 6"


def test_plain_line_endings_normalised() -> None:
    assert clean_plain_text("a\r\nb\rc\n") == "a\nb\nc"


def test_plain_control_characters_removed_except_newline_and_tab() -> None:
    assert clean_plain_text("a\x00b\x07c\td\x1b[0m\x7f e\x85f\x0bg\nh") == "abc\td[0m efg\nh"


def test_plain_blank_lines_collapsed_and_trailing_spaces_stripped() -> None:
    assert clean_plain_text("  \n\npara one   \nline two\t\n\n\n\n \n\npara two  \n\n") == "para one\nline two\n\npara two"


def test_plain_markdown_kept() -> None:
    text = "**bold** and `code`\n\n* item\n* item 2\n\n    indented code"
    assert clean_plain_text(text) == text


@pytest.mark.parametrize(
    ("broken", "fixed"),
    [
        ("cafÃ©", "café"),
        ("itâ€™s", "it’s"),
        ("â€œquotedâ€\x9d â€” dashâ€¦", "“quoted” — dash…"),
        ("naÃ¯ve rÃ©sumÃ©", "naïve résumé"),
        ("100 Â£", "100 £"),
    ],
)
def test_plain_mojibake_repaired(broken: str, fixed: str) -> None:
    assert clean_plain_text(broken) == fixed


@pytest.mark.parametrize(
    "text",
    ["привет мир", "日本語のテキスト", "emoji 😀 👍🏽", "Straße“ and CAFÉ…", "ASÍ…", "שלום", "naïve résumé"],
)
def test_plain_mojibake_round_trip(text: str) -> None:
    assert clean_plain_text(_mojibake(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "café naïve résumé",
        "it’s “fine” — really…",
        "Straße“",  # ß + “ is a valid UTF-8 pair when re-encoded, yet genuine German
        "CAFÉ…",  # É + … likewise
        "AQUÍ»",
        "Ü’s",
        "£100 ± 5 °C ©",
        "Ελληνικά и русский",
        "ZWJ emoji 👩‍💻",
    ],
)
def test_plain_correct_text_untouched(text: str) -> None:
    assert clean_plain_text(text) == text


def test_plain_mojibake_fixed_only_in_broken_runs() -> None:
    assert clean_plain_text("déjà vu, but cafÃ© was broken") == "déjà vu, but café was broken"


@pytest.mark.parametrize("text", ["", "   ", "\r\n\r\n", "\x00\x01"])
def test_plain_empty_or_blank(text: str) -> None:
    assert clean_plain_text(text) == ""


def test_plain_text_skips_only_rules_that_cannot_match() -> None:
    """clean_plain_text runs the trailing-space and blank-line rules only where a string search says they can
    match; on random strings of the characters those rules and the others act on, it gives what running
    every rule always gives."""
    import html
    import random

    def every_rule(text: str) -> str:
        if not text:
            return ""
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = clean._ENTITY.sub(lambda m: html.unescape(m.group()), text)
        if not text.isascii():
            text = clean._fix_mojibake(text)
        text = clean._CONTROL.sub("", text)
        text = re.sub("[ \t]+$", "", text, flags=re.MULTILINE)
        text = re.sub("\n{3,}", "\n\n", text)
        return text.strip()

    alphabet = ["a", "b", " ", "\t", "\n", "\r", "\x0b", "\x0c", "\x85", "&amp;", "é", "Ã©", "\x00"]
    rng = random.Random(0)
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        assert clean_plain_text(text) == every_rule(text), repr(text)
    assert clean_plain_text("a \t\n\n\n\nb  ") == "a\n\nb"
