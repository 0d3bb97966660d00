/*
 * alignflow.tasks.ingest._fasthtml: html_to_text for the common shapes of a post body, without libxml2.
 *
 * render(html: str) -> str | None
 * render_utf8: a capsule (RENDER_UTF8_CAPSULE below) holding the same renderer for C callers, on UTF-8 bytes
 *              (tasks/ingest/_fastposts.c renders a row's body with it, without a Python str either way)
 *
 * Most Stack Exchange bodies are paragraphs, code blocks, lists, quotes and headings with a few inline
 * tags, well formed. For those, clean.html_to_text spends most of its time building libxml2's tree and walking
 * it from Python. This module renders them in one pass over the string, with the renderer's rules
 * (tasks/ingest/clean.py), and returns None for anything outside the subset below, which then goes
 * through libxml2 as before:
 *
 *   body       := ws* (block ws*)*            or text without any '<' (one paragraph)
 *   block      := <p> inline </p> | <hN> inline </hN> (N 1..6) | <hr> | <hr/> | <hr />
 *               | <pre attrs><code> code </code></pre> | <pre attrs> code </pre>
 *               | <ul> ws* (<li> flow </li> ws*)* </ul>    (<ol> likewise, numbered from 1;
 *                                                          <ol start="D"> from D, 1 to 9 ASCII digits)
 *               | <blockquote> flow </blockquote> | <div attrs> flow </div>
 *               | <table attrs> ws* ((<thead attrs> | <tbody attrs> | <tfoot attrs>) ws* row* </tsection> ws*
 *                                   | row)* </table>
 *   row        := <tr attrs> ws* ((<td attrs> flow </td> | <th attrs> flow </th>) ws*)* </tr> ws*
 *                 (no <table inside a cell)
 *   flow       := (block | inline)*           (each run of inline content is a paragraph)
 *   inline     := (text | <code> code </code> | <br> | <br/> | <br /> | <img attrs> (at most one alt)
 *                  | <T attrs> | </T attrs>)*   T in TRANSPARENT (a em strong b i span sub sup ...)
 *   attrs      := ([ \t\n]+ name="value")* [ \t\n]*    name [a-z][a-z0-9-]*, value without " < >
 *   text, code := characters other than '<', with the entities &amp; &lt; &gt; &quot; &#39; &nbsp;
 *   ws         := [ \t\n]
 *
 * nested at most 32 deep, and none of: another '&', a control character (C0 but \t and \n, DEL, C1), a
 * non-character (U+FDD0..U+FDEF, U+FFFE, U+FFFF), U+FEFF, a Unicode space other than U+00A0 (their rendering takes the
 * renderer's slower branch), invalid UTF-8 (a lone surrogate). The inline tags only carry text, so
 * their nesting cannot change the rendering; everything else that libxml2 might close, move or drop by
 * itself is outside the subset. tests/test_clean_fast_path.py renders generated and mutated bodies both
 * ways and requires the same text.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "render_utf8.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Buf;

static int buf_reserve(Buf *b, Py_ssize_t extra) {
    if (b->len + extra <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra)
        cap *= 2;
    char *data = PyMem_Realloc(b->data, (size_t)cap);
    if (data == NULL)
        return -1;
    b->data = data;
    b->cap = cap;
    return 0;
}

static int buf_put(Buf *b, const char *s, Py_ssize_t n) {
    if (n <= 0)
        return 0;
    if (buf_reserve(b, n) < 0)
        return -1;
    memcpy(b->data + b->len, s, (size_t)n);
    b->len += n;
    return 0;
}

static inline int buf_char(Buf *b, char c) {
    if (b->len < b->cap) { /* the common case: room left, no call */
        b->data[b->len++] = c;
        return 0;
    }
    return buf_put(b, &c, 1);
}

/* A parsing step returns what the capsule's renderer returns (render_utf8.h): OK, OUTSIDE (not in the subset:
 * return None), ERROR (MemoryError). */

typedef struct {
    const char *s;
    Py_ssize_t n;
} Src;

static int starts(const Src *src, Py_ssize_t i, const char *lit) {
    Py_ssize_t k = (Py_ssize_t)strlen(lit);
    return i + k <= src->n && memcmp(src->s + i, lit, (size_t)k) == 0;
}

static inline int is_ws(char c) { return c == ' ' || c == '\t' || c == '\n'; }

/* A character the subset takes, written or from a character reference: not a control (C0 but \t and \n,
 * DEL, C1), a surrogate, a non-character, U+FEFF (libxml2 may take it for a BOM), or a Unicode space the
 * renderer treats apart (its slower branch); U+00A0 is fine. */
static int char_ok(unsigned long cp) {
    if (cp == '\t' || cp == '\n' || (cp >= 0x20 && cp <= 0x7E))
        return 1;
    if (cp < 0xA0 || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    if (cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
        cp == 0x205F || cp == 0x3000 || cp == 0xFEFF || (cp >= 0xFDD0 && cp <= 0xFDEF) || (cp & 0xFFFE) == 0xFFFE)
        return 0;
    return 1;
}

/* Check every character once with char_ok. UTF-8 from CPython is valid, so lead bytes tell the length. */
static int check_chars(const Src *src) {
    const unsigned char *s = (const unsigned char *)src->s;
    Py_ssize_t n = src->n;
    for (Py_ssize_t i = 0; i < n;) {
        unsigned char c = s[i];
        unsigned long cp;
        int len;
        if (c < 0x80) { /* ASCII, most of a body: printable, tab or newline */
            if ((c >= 0x20 && c < 0x7F) || c == '\t' || c == '\n') {
                i++;
                continue;
            }
            return OUTSIDE;
        } else if (c < 0xE0) {
            cp = c & 0x1F;
            len = 2;
        } else if (c < 0xF0) {
            cp = c & 0x0F;
            len = 3;
        } else {
            cp = c & 0x07;
            len = 4;
        }
        if (i + len > n)
            return OUTSIDE;
        for (int k = 1; k < len; k++)
            cp = (cp << 6) | (s[i + k] & 0x3F);
        if (!char_ok(cp))
            return OUTSIDE;
        i += len;
    }
    return OK;
}


static int put_utf8(Buf *out, unsigned long cp) {
    char u[4];
    int n;
    if (cp < 0x80) {
        u[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        u[0] = (char)(0xC0 | (cp >> 6));
        u[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        u[0] = (char)(0xE0 | (cp >> 12));
        u[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        u[0] = (char)(0xF0 | (cp >> 18));
        u[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    return buf_put(out, u, n);
}

/* The named references the subset decodes (HTML 4 names; their code points are the same in HTML 5). */
static const struct {
    const char *name;
    unsigned long cp;
} NAMED[] = {
    {"amp", '&'}, {"lt", '<'}, {"gt", '>'}, {"quot", '"'}, {"nbsp", 0xA0},
    {"mdash", 0x2014}, {"ndash", 0x2013}, {"lsquo", 0x2018}, {"rsquo", 0x2019}, {"ldquo", 0x201C},
    {"rdquo", 0x201D}, {"hellip", 0x2026}, {"bull", 0x2022}, {"middot", 0xB7}, {"copy", 0xA9}, {"reg", 0xAE},
    {"trade", 0x2122}, {"deg", 0xB0}, {"plusmn", 0xB1}, {"times", 0xD7}, {"divide", 0xF7}, {"laquo", 0xAB},
    {"raquo", 0xBB}, {"larr", 0x2190}, {"rarr", 0x2192}, {"uarr", 0x2191}, {"darr", 0x2193}, {"harr", 0x2194},
    {"lArr", 0x21D0}, {"rArr", 0x21D2}, {"hArr", 0x21D4}, {"le", 0x2264}, {"ge", 0x2265}, {"ne", 0x2260},
    {"asymp", 0x2248}, {"infin", 0x221E}, {"sup2", 0xB2}, {"sup3", 0xB3}, {"frac12", 0xBD}, {"frac14", 0xBC},
    {"frac34", 0xBE}, {"micro", 0xB5}, {"para", 0xB6}, {"sect", 0xA7}, {"euro", 0x20AC}, {"pound", 0xA3},
    {"cent", 0xA2}, {"yen", 0xA5}, {"iexcl", 0xA1}, {"iquest", 0xBF},
};

/* The character reference at s[i] ('&'): its code point and length, or 0 when it is outside the subset
 * (no ';', a name not in NAMED, a number out of range or for a character the subset refuses). */
static Py_ssize_t entity_at(const char *s, Py_ssize_t i, Py_ssize_t end, unsigned long *cp) {
    Py_ssize_t j = i + 1;
    if (j < end && s[j] == '#') {
        int hex = j + 1 < end && (s[j + 1] == 'x' || s[j + 1] == 'X');
        j += hex ? 2 : 1;
        Py_ssize_t digits = 0;
        unsigned long value = 0;
        for (; j < end && digits < 7; j++, digits++) {
            char c = s[j];
            int d = (c >= '0' && c <= '9') ? c - '0'
                    : hex && c >= 'a' && c <= 'f' ? c - 'a' + 10
                    : hex && c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
            if (d < 0)
                break;
            value = value * (hex ? 16 : 10) + (unsigned long)d;
        }
        if (digits == 0 || j >= end || s[j] != ';' || !char_ok(value))
            return 0;
        *cp = value;
        return j + 1 - i;
    }
    for (size_t k = 0; k < sizeof NAMED / sizeof NAMED[0]; k++) {
        Py_ssize_t len = (Py_ssize_t)strlen(NAMED[k].name);
        if (j + len < end && memcmp(s + j, NAMED[k].name, (size_t)len) == 0 && s[j + len] == ';') {
            *cp = NAMED[k].cp;
            return len + 2;
        }
    }
    return 0;
}

/* Append the text s[i:end] (no '<' in it) with its character references decoded. */
static int put_text(Buf *out, const Src *src, Py_ssize_t i, Py_ssize_t end) {
    const char *s = src->s;
    while (i < end) {
        const char *amp = memchr(s + i, '&', (size_t)(end - i));
        Py_ssize_t stop = amp ? (Py_ssize_t)(amp - s) : end;
        if (buf_put(out, s + i, stop - i) < 0)
            return ERROR;
        if (!amp)
            return OK;
        unsigned long cp;
        Py_ssize_t len = entity_at(s, stop, end, &cp);
        if (len == 0)
            return OUTSIDE;
        if (put_utf8(out, cp) < 0)
            return ERROR;
        i = stop + len;
    }
    return OK;
}

/* Whitespace as the renderer collapses it: ' ', '\t', '\n' and U+00A0 (the other Unicode spaces are
 * outside the subset). Returns the length of the whitespace character at s[i], 0 if none. */
static inline Py_ssize_t ws_len(const char *s, Py_ssize_t i, Py_ssize_t n) {
    if (is_ws(s[i]))
        return 1;
    if ((unsigned char)s[i] == 0xC2 && i + 1 < n && (unsigned char)s[i + 1] == 0xA0)
        return 2;
    return 0;
}

/* _flush's whitespace rule: runs of whitespace in raw[0:len] become one space, none at either end. */
static int collapse_ws(Buf *dst, const char *raw, Py_ssize_t len) {
    /* the result is never longer than raw (a space written stands for at least one byte of whitespace read) */
    if (buf_reserve(dst, len) < 0)
        return ERROR;
    char *const body = dst->data + dst->len;
    char *o = body;
    int pending_space = 0;
    Py_ssize_t scalar_until = 0; /* bytes before it go one at a time (a block the fast path did not take) */
    for (Py_ssize_t i = 0; i < len;) {
#if defined(__SSE2__)
        /* Sixteen bytes whose only whitespace is single spaces between other bytes (most of prose) come out as
         * they are: copied at once, after the space pending from before. */
        if (i >= scalar_until && len - i >= 16) {
            __m128i v = _mm_loadu_si128((const __m128i *)(raw + i));
            unsigned sp = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(' ')));
            __m128i tab = _mm_cmpeq_epi8(v, _mm_set1_epi8('\t')), nl = _mm_cmpeq_epi8(v, _mm_set1_epi8('\n'));
            __m128i c2 = _mm_cmpeq_epi8(v, _mm_set1_epi8((char)0xC2)); /* U+00A0's first byte */
            unsigned other = (unsigned)_mm_movemask_epi8(_mm_or_si128(_mm_or_si128(tab, nl), c2));
            int plain = !other && !(sp & (sp >> 1)) && !(sp & 0x8000) && !((sp & 1) && (pending_space || o == body));
            if (plain) {
                if (pending_space && o > body)
                    *o++ = ' ';
                pending_space = 0;
                memcpy(o, raw + i, 16);
                o += 16;
                i += 16;
                continue;
            }
            scalar_until = i + 16;
        }
#endif
        Py_ssize_t w = ws_len(raw, i, len);
        if (w) {
            pending_space = 1;
            i += w;
            continue;
        }
        if (pending_space && o > body)
            *o++ = ' ';
        pending_space = 0;
        *o++ = raw[i++];
    }
    dst->len = o - dst->data;
    return OK;
}

/* _inline_code: code text (decoded) -> whitespace runs (with U+00A0) collapsed to one space, then
 * wrapped in a backtick fence longer than any backtick run inside (padded when there is one), unless it
 * is only spaces. */
static int put_inline_code(Buf *out, const char *code, Py_ssize_t len) {
    Buf norm = {0};
    int rc = OK;
    int in_ws = 0, only_spaces = 1, longest = 0, run = 0;
    for (Py_ssize_t i = 0; i < len;) {
        Py_ssize_t w = ws_len(code, i, len);
        if (w) {
            if (!in_ws && buf_char(&norm, ' ') < 0) { rc = ERROR; goto done; }
            in_ws = 1;
            run = 0;
            i += w;
            continue;
        }
        in_ws = 0;
        only_spaces = 0;
        if (code[i] == '`') {
            run++;
            if (run > longest)
                longest = run;
        } else {
            run = 0;
        }
        if (buf_char(&norm, code[i]) < 0) { rc = ERROR; goto done; }
        i++;
    }
    if (only_spaces) {
        if (buf_put(out, norm.data, norm.len) < 0)
            rc = ERROR;
        goto done;
    }
    int fence = longest + 1;
    if (buf_reserve(out, norm.len + 2 * fence + 2) < 0) { rc = ERROR; goto done; }
    for (int k = 0; k < fence; k++) out->data[out->len++] = '`';
    if (longest) out->data[out->len++] = ' ';
    memcpy(out->data + out->len, norm.data ? norm.data : "", (size_t)norm.len);
    out->len += norm.len;
    if (longest) out->data[out->len++] = ' ';
    for (int k = 0; k < fence; k++) out->data[out->len++] = '`';
done:
    PyMem_Free(norm.data);
    return rc;
}

/* Attributes from s[j] (just after a tag name) to the tag's end: ([ \t\n]+ name="value")* [ \t\n]* then '>'
 * (or "/>" where `void_ok`). Returns the index after the tag, or -1 when it is not of that form. The value
 * of `alt` is reported in [*alt_a, *alt_b), and *alts counts the alt attributes. */
static Py_ssize_t attrs_end(const Src *src, Py_ssize_t j, int void_ok, Py_ssize_t *alt_a, Py_ssize_t *alt_b,
                            int *alts) {
    const char *s = src->s;
    Py_ssize_t n = src->n;
    for (;;) {
        Py_ssize_t k = j;
        while (k < n && is_ws(s[k]))
            k++;
        if (k < n && s[k] == '>')
            return k + 1;
        if (void_ok && k + 1 < n && s[k] == '/' && s[k + 1] == '>')
            return k + 2;
        if (k == j || k >= n || !(s[k] >= 'a' && s[k] <= 'z'))
            return -1;
        Py_ssize_t name = k;
        while (k < n && ((s[k] >= 'a' && s[k] <= 'z') || (s[k] >= '0' && s[k] <= '9') || s[k] == '-'))
            k++;
        int is_alt = k - name == 3 && memcmp(s + name, "alt", 3) == 0;
        if (k + 1 >= n || s[k] != '=' || s[k + 1] != '"')
            return -1;
        k += 2;
        Py_ssize_t value = k;
        while (k < n && s[k] != '"' && s[k] != '<' && s[k] != '>')
            k++;
        if (k >= n || s[k] != '"')
            return -1;
        if (is_alt && alts != NULL) {
            *alt_a = value;
            *alt_b = k;
            (*alts)++;
        }
        j = k + 1;
    }
}

/* The tag `name` at s[i] (just after '<' or '</') with its attributes: the index after its '>', or -1. */
static Py_ssize_t tag_end(const Src *src, Py_ssize_t i, const char *name) {
    Py_ssize_t len = (Py_ssize_t)strlen(name);
    if (i + len < src->n && memcmp(src->s + i, name, (size_t)len) == 0 &&
        (is_ws(src->s[i + len]) || src->s[i + len] == '>'))
        return attrs_end(src, i + len, 0, NULL, NULL, NULL);
    return -1;
}

/* Inline tags that only carry text (the renderer's default case): open or close, with attributes. */
static const char *TRANSPARENT[] = {"a", "em", "strong", "b", "i", "span", "sub", "sup", "s", "strike", "del",
                                    "ins", "kbd", "u", "small", "big", "abbr", "mark", "cite"};

/* One inline element at s[*pos] ('<'): its text into `raw` (a <code>'s rendered, an image's alt, '\0' for a
 * line break), *pos moved past it. OUTSIDE for any other tag. */
static int inline_element(const Src *src, Py_ssize_t *pos, Buf *raw) {
    const char *s = src->s;
    Py_ssize_t n = src->n, i = *pos;
    if (starts(src, i, "<code>")) {
        Py_ssize_t c = i + 6;
        const char *lt = memchr(s + c, '<', (size_t)(n - c));
        Py_ssize_t e = lt ? (Py_ssize_t)(lt - s) : -1;
        if (e < 0 || !starts(src, e, "</code>"))
            return OUTSIDE;
        Buf code = {0};
        int rc = put_text(&code, src, c, e);
        if (rc == OK)
            rc = put_inline_code(raw, code.data ? code.data : "", code.len);
        PyMem_Free(code.data);
        *pos = e + 7;
        return rc;
    }
    if (starts(src, i, "<br>") || starts(src, i, "<br/>") || starts(src, i, "<br />")) {
        *pos = i + (s[i + 3] == '>' ? 4 : s[i + 3] == '/' ? 5 : 6);
        return buf_char(raw, '\0') < 0 ? ERROR : OK; /* _BR: flush_inline turns it into a line break */
    }
    if (starts(src, i, "<img") && i + 4 < n && (is_ws(s[i + 4]) || s[i + 4] == '>' || s[i + 4] == '/')) {
        Py_ssize_t alt_a = 0, alt_b = 0;
        int alts = 0;
        Py_ssize_t end = attrs_end(src, i + 4, 1, &alt_a, &alt_b, &alts);
        if (end < 0 || alts > 1)
            return OUTSIDE;
        *pos = end;
        return alts ? put_text(raw, src, alt_a, alt_b) : OK;
    }
    int closing = i + 1 < n && s[i + 1] == '/';
    for (size_t k = 0; k < sizeof TRANSPARENT / sizeof TRANSPARENT[0]; k++) {
        Py_ssize_t end = tag_end(src, i + 1 + closing, TRANSPARENT[k]);
        if (end >= 0) {
            *pos = end;
            return OK;
        }
    }
    return OUTSIDE;
}

/* Inline content from s[*pos] up to the closing literal `close` (e.g. "</p>"): rendered into `raw`,
 * *pos moved past `close`. */
static int parse_inline(const Src *src, Py_ssize_t *pos, const char *close, Buf *raw) {
    const char *s = src->s;
    Py_ssize_t n = src->n, i = *pos;
    while (i < n) {
        const char *lt = memchr(s + i, '<', (size_t)(n - i));
        if (!lt)
            return OUTSIDE;
        Py_ssize_t at = (Py_ssize_t)(lt - s);
        int rc = put_text(raw, src, i, at);
        if (rc != OK)
            return rc;
        i = at;
        if (starts(src, i, close)) {
            *pos = i + (Py_ssize_t)strlen(close);
            return OK;
        }
        if ((rc = inline_element(src, &i, raw)) != OK)
            return rc;
    }
    return OUTSIDE;
}

static Py_ssize_t skip_ws(const Src *src, Py_ssize_t i) {
    while (i < src->n && is_ws(src->s[i]))
        i++;
    return i;
}

/* The renderer's list of blocks; a list's block is marked (inside an item it follows the line above). */
typedef struct {
    Buf text;
    int is_list;
} Block;

typedef struct {
    Block *v;
    int n, cap;
} Blocks;

static void blocks_free(Blocks *b) {
    for (int k = 0; k < b->n; k++)
        PyMem_Free(b->v[k].text.data);
    PyMem_Free(b->v);
    b->v = NULL;
    b->n = b->cap = 0;
}

static Block *blocks_push(Blocks *b, int is_list) {
    if (b->n == b->cap) {
        int cap = b->cap ? 2 * b->cap : 8;
        Block *v = PyMem_Realloc(b->v, (size_t)cap * sizeof(Block));
        if (v == NULL)
            return NULL;
        b->v = v;
        b->cap = cap;
    }
    Block *block = &b->v[b->n++];
    block->text = (Buf){0};
    block->is_list = is_list;
    return block;
}

/* `text` as a new block, moved there (it is left empty); nothing when it is empty. */
static int blocks_take(Blocks *b, int is_list, Buf *text) {
    if (text->len == 0)
        return OK;
    Block *block = blocks_push(b, is_list);
    if (block == NULL)
        return ERROR;
    block->text = *text;
    *text = (Buf){0};
    return OK;
}

static void blocks_drop_last(Blocks *b) {
    b->n--;
    PyMem_Free(b->v[b->n].text.data);
}

/* _flush on raw[0:len] into `text`: whitespace collapsed; then, where there are line breaks ('\0'), each
 * with a space on either side becomes "\n", newlines and spaces go at both ends, and runs of three or more
 * newlines become two. */
static int paragraph_text(const Buf *raw, Buf *text) {
    if (collapse_ws(text, raw->data ? raw->data : "", raw->len) < 0)
        return ERROR;
    if (text->len == 0 || memchr(text->data, '\0', (size_t)text->len) == NULL)
        return OK;
    Buf out = {0};
    Py_ssize_t n = text->len;
    const char *t = text->data;
    for (Py_ssize_t k = 0; k < n; k++) {
        if (t[k] == ' ' && k + 1 < n && t[k + 1] == '\0')
            continue; /* " ?\0 ?": the space before */
        if (t[k] == '\0') {
            if (buf_char(&out, '\n') < 0) { PyMem_Free(out.data); return ERROR; }
            if (k + 1 < n && t[k + 1] == ' ')
                k++; /* the space after */
            continue;
        }
        if (buf_char(&out, t[k]) < 0) { PyMem_Free(out.data); return ERROR; }
    }
    Py_ssize_t a = 0, b = out.len;
    while (a < b && (out.data[a] == '\n' || out.data[a] == ' '))
        a++;
    while (b > a && (out.data[b - 1] == '\n' || out.data[b - 1] == ' '))
        b--;
    text->len = 0;
    int newlines = 0;
    for (Py_ssize_t k = a; k < b; k++) {
        newlines = out.data[k] == '\n' ? newlines + 1 : 0;
        if (newlines > 2)
            continue;
        if (buf_char(text, out.data[k]) < 0) { PyMem_Free(out.data); return ERROR; }
    }
    PyMem_Free(out.data);
    return OK;
}

/* _flush: the pending inline text as one more block (none if it is empty). */
static int flush_inline(Buf *raw, Blocks *out) {
    if (raw->len == 0)
        return OK;
    Block *block = blocks_push(out, 0);
    if (block == NULL || paragraph_text(raw, &block->text) < 0)
        return ERROR;
    if (block->text.len == 0)
        blocks_drop_last(out);
    raw->len = 0;
    return OK;
}

/* "\n\n".join(blocks) (sep "\n\n"), or _join_item (a list after the first block follows with "\n"). */
static int join_blocks(const Blocks *blocks, int item, Buf *out) {
    for (int k = 0; k < blocks->n; k++) {
        if (k > 0 && buf_put(out, item && blocks->v[k].is_list ? "\n" : "\n\n", item && blocks->v[k].is_list ? 1 : 2) < 0)
            return ERROR;
        if (buf_put(out, blocks->v[k].text.data, blocks->v[k].text.len) < 0)
            return ERROR;
    }
    return OK;
}

/* _prefix_lines: `first` before the first line, `rest` before the others; an empty line gets the prefix
 * without its trailing space. */
static int prefix_lines(const Buf *in, const char *first, const char *rest, Buf *out) {
    Py_ssize_t start = 0;
    int line_no = 0;
    for (Py_ssize_t k = 0; k <= in->len; k++) {
        if (k < in->len && in->data[k] != '\n')
            continue;
        const char *prefix = line_no == 0 ? first : rest;
        Py_ssize_t plen = (Py_ssize_t)strlen(prefix);
        if (k == start)
            while (plen > 0 && prefix[plen - 1] == ' ')
                plen--;
        if ((line_no > 0 && buf_char(out, '\n') < 0) || buf_put(out, prefix, plen) < 0 ||
            buf_put(out, in->data + start, k - start) < 0)
            return ERROR;
        start = k + 1;
        line_no++;
    }
    return OK;
}

#define MAX_DEPTH 32

static int parse_flow(const Src *src, Py_ssize_t *pos, const char *close, int allow_inline, int depth, Blocks *out);

static int render_pre(const Src *src, Py_ssize_t *pos, Blocks *out) {
    const char *s = src->s;
    Py_ssize_t i = *pos, n = src->n;
    int with_code = starts(src, i, "<code>");
    if (with_code)
        i += 6;
    const char *lt = memchr(s + i, '<', (size_t)(n - i));
    if (!lt)
        return OUTSIDE;
    Py_ssize_t e = (Py_ssize_t)(lt - s);
    const char *close = with_code ? "</code></pre>" : "</pre>";
    if (!starts(src, e, close))
        return OUTSIDE;
    Buf code = {0};
    int rc = put_text(&code, src, i, e);
    if (rc != OK)
        goto done;
    /* HTML drops one newline right after <pre>; U+00A0 becomes a space; trailing newlines go */
    Py_ssize_t a = 0, b = code.len;
    if (b > 0 && code.data[0] == '\n')
        a = 1;
    while (b > a && code.data[b - 1] == '\n')
        b--;
    Block *block = blocks_push(out, 0);
    if (block == NULL || buf_put(&block->text, "```\n", 4) < 0) { rc = ERROR; goto done; }
    for (Py_ssize_t k = a; k < b; k++) {
        if ((unsigned char)code.data[k] == 0xC2 && k + 1 < b && (unsigned char)code.data[k + 1] == 0xA0) {
            if (buf_char(&block->text, ' ') < 0) { rc = ERROR; goto done; }
            k++;
        } else if (buf_char(&block->text, code.data[k]) < 0) {
            rc = ERROR;
            goto done;
        }
    }
    if (buf_put(&block->text, b > a ? "\n```" : "```", b > a ? 4 : 3) < 0) { rc = ERROR; goto done; }
    *pos = e + (Py_ssize_t)strlen(close);
done:
    PyMem_Free(code.data);
    return rc;
}

/* <ol start="D"> at s[i], D 1 to 9 ASCII digits and nothing else in the tag: the index after its '>' and D in
 * *first, or -1. The renderer numbers from int(start.strip()); any other value (a sign, spaces, other
 * digits, a second attribute) goes to libxml2. */
static Py_ssize_t ol_start(const Src *src, Py_ssize_t i, long long *first) {
    if (!starts(src, i, "<ol start=\""))
        return -1;
    Py_ssize_t j = i + 11, k = j;
    long long value = 0;
    while (k < src->n && k - j < 9 && src->s[k] >= '0' && src->s[k] <= '9')
        value = value * 10 + (src->s[k++] - '0');
    if (k == j || !starts(src, k, "\">"))
        return -1;
    *first = value;
    return k + 2;
}

/* <ul>/<ol>: each <li>'s blocks joined as an item, prefixed by its marker (an <ol>'s numbered from `first`);
 * the items one per line. */
static int render_list(const Src *src, Py_ssize_t *pos, int ordered, long long first, int depth, Blocks *out) {
    const char *close = ordered ? "</ol>" : "</ul>";
    Py_ssize_t i = skip_ws(src, *pos);
    Buf items = {0};
    int nitems = 0, rc = OK;
    while (!starts(src, i, close)) {
        if (!starts(src, i, "<li>")) { rc = OUTSIDE; goto done; }
        i += 4;
        Blocks sub = {0};
        Buf joined = {0};
        rc = parse_flow(src, &i, "</li>", 1, depth + 1, &sub);
        if (rc == OK) {
            char marker[32];
            int mlen = ordered ? snprintf(marker, sizeof marker, "%lld. ", first + nitems) : snprintf(marker, sizeof marker, "- ");
            if (nitems > 0 && buf_char(&items, '\n') < 0) {
                rc = ERROR;
            } else if (sub.n == 0) {
                if (buf_put(&items, marker, mlen - 1) < 0)
                    rc = ERROR;
            } else if (join_blocks(&sub, 1, &joined) < 0 || prefix_lines(&joined, marker, "  ", &items) < 0) {
                rc = ERROR;
            }
            nitems++;
        }
        blocks_free(&sub);
        PyMem_Free(joined.data);
        if (rc != OK)
            goto done;
        i = skip_ws(src, i);
    }
    *pos = i + 5;
    if (nitems && blocks_take(out, 1, &items) != OK)
        rc = ERROR;
done:
    PyMem_Free(items.data);
    return rc;
}

/* <blockquote>: its blocks, "\n\n" between them, every line prefixed by "> ". */
static int render_quote(const Src *src, Py_ssize_t *pos, int depth, Blocks *out) {
    Blocks sub = {0};
    Buf joined = {0};
    int rc = parse_flow(src, pos, "</blockquote>", 1, depth + 1, &sub);
    if (rc == OK && sub.n) {
        Block *block = blocks_push(out, 0);
        if (block == NULL || join_blocks(&sub, 0, &joined) < 0 || prefix_lines(&joined, "> ", "> ", &block->text) < 0)
            rc = ERROR;
    }
    blocks_free(&sub);
    PyMem_Free(joined.data);
    return rc;
}

/* The tag `name` with attributes at s[i] ('<'): the index after its '>', or -1. */
static Py_ssize_t open_tag(const Src *src, Py_ssize_t i, const char *name) {
    return i < src->n && src->s[i] == '<' ? tag_end(src, i + 1, name) : -1;
}

static int has_table(const Src *src, Py_ssize_t a, Py_ssize_t b) {
    for (Py_ssize_t k = a; k + 6 <= b; k++)
        if (src->s[k] == '<' && memcmp(src->s + k, "<table", 6) == 0)
            return 1;
    return 0;
}

/* One <tr> from s[*pos] (after its start tag): its cells (<td>/<th>, each a flow of blocks put on one line,
 * the blocks joined by spaces) joined by " | ", spaces stripped at both ends, as one line of `rows`; nothing if
 * every cell is empty. Only whitespace between the cells, and no table inside one. */
static int render_row(const Src *src, Py_ssize_t *pos, int depth, Buf *rows, int *nrows) {
    Py_ssize_t i = *pos;
    Buf line = {0};
    int ncells = 0, any = 0, rc = OK;
    for (;;) {
        i = skip_ws(src, i);
        if (starts(src, i, "</tr>")) {
            i += 5;
            break;
        }
        const char *close = "</td>";
        Py_ssize_t e = open_tag(src, i, "td");
        if (e < 0) {
            close = "</th>";
            e = open_tag(src, i, "th");
        }
        if (e < 0) { rc = OUTSIDE; goto done; }
        i = e;
        Blocks sub = {0};
        rc = parse_flow(src, &i, close, 1, depth + 1, &sub);
        if (rc == OK && has_table(src, e, i))
            rc = OUTSIDE;
        if (rc == OK && ncells > 0 && buf_put(&line, " | ", 3) < 0)
            rc = ERROR;
        for (int k = 0; rc == OK && k < sub.n; k++) {
            const Buf *t = &sub.v[k].text;
            if (k > 0 && buf_char(&line, ' ') < 0) {
                rc = ERROR;
            } else if (buf_put(&line, t->data, t->len) < 0) {
                rc = ERROR;
            } else { /* a cell is one line */
                for (Py_ssize_t c = line.len - t->len; c < line.len; c++)
                    if (line.data[c] == '\n')
                        line.data[c] = ' ';
            }
        }
        any |= sub.n > 0;
        ncells++;
        blocks_free(&sub);
        if (rc != OK)
            goto done;
    }
    if (any) {
        Py_ssize_t a = 0, b = line.len;
        while (a < b && line.data[a] == ' ')
            a++;
        while (b > a && line.data[b - 1] == ' ')
            b--;
        if ((*nrows > 0 && buf_char(rows, '\n') < 0) || buf_put(rows, line.data + a, b - a) < 0)
            rc = ERROR;
        (*nrows)++;
    }
    *pos = i;
done:
    PyMem_Free(line.data);
    return rc;
}

/* <table> from s[*pos] (after its start tag): one line per row that has a non-empty cell (render_row), as the
 * renderer's _table. Rows sit in the table itself or in <thead>, <tbody> or <tfoot>, with only whitespace
 * between the tags. */
static int render_table(const Src *src, Py_ssize_t *pos, int depth, Blocks *out) {
    static const char *SECTIONS[] = {"thead", "tbody", "tfoot"};
    static const char *SECTION_ENDS[] = {"</thead>", "</tbody>", "</tfoot>"};
    Py_ssize_t i = *pos;
    const char *section_end = NULL;
    Buf rows = {0};
    int nrows = 0, rc = OK;
    for (;;) {
        i = skip_ws(src, i);
        if (section_end == NULL && starts(src, i, "</table>")) {
            i += 8;
            break;
        }
        if (section_end != NULL && starts(src, i, section_end)) {
            i += (Py_ssize_t)strlen(section_end);
            section_end = NULL;
            continue;
        }
        Py_ssize_t e = -1;
        for (int k = 0; section_end == NULL && e < 0 && k < 3; k++)
            if ((e = open_tag(src, i, SECTIONS[k])) >= 0)
                section_end = SECTION_ENDS[k];
        if (e >= 0) {
            i = e;
            continue;
        }
        if ((e = open_tag(src, i, "tr")) < 0) { rc = OUTSIDE; goto done; }
        i = e;
        if ((rc = render_row(src, &i, depth, &rows, &nrows)) != OK)
            goto done;
    }
    *pos = i;
    if (nrows && blocks_take(out, 0, &rows) != OK)
        rc = ERROR;
done:
    PyMem_Free(rows.data);
    return rc;
}

/* <hN>: _HEADINGS[tag] + its text ("## " for <h2>); nothing for an empty heading. */
static int render_heading(const Src *src, Py_ssize_t *pos, const char *close, int level, Blocks *out) {
    Buf raw = {0}, text = {0};
    int rc = parse_inline(src, pos, close, &raw);
    if (rc == OK && paragraph_text(&raw, &text) < 0)
        rc = ERROR;
    for (Py_ssize_t k = 0; rc == OK && k < text.len; k++)
        if (text.data[k] == '\n') /* a line break in a heading is a space */
            text.data[k] = ' ';
    if (rc == OK && text.len) {
        static const char hashes[] = "###### ";
        Block *block = blocks_push(out, 0);
        if (block == NULL || buf_put(&block->text, hashes + 6 - level, level + 1) < 0 ||
            buf_put(&block->text, text.data, text.len) < 0)
            rc = ERROR;
    }
    PyMem_Free(raw.data);
    PyMem_Free(text.data);
    return rc;
}

/* Flow content from s[*pos] up to `close` (NULL: the end of the body): blocks, and where `allow_inline`
 * (inside <li> and <blockquote>) inline content between them, each run a paragraph as _blocks makes it.
 * At the top level only whitespace may sit between blocks: libxml2 would open a paragraph for text. */
static int parse_flow(const Src *src, Py_ssize_t *pos, const char *close, int allow_inline, int depth, Blocks *out) {
    if (depth > MAX_DEPTH)
        return OUTSIDE;
    const char *s = src->s;
    Py_ssize_t n = src->n, i = *pos;
    Buf raw = {0};
    int rc = OK;
    for (;;) {
        const char *lt = i < n ? memchr(s + i, '<', (size_t)(n - i)) : NULL;
        Py_ssize_t at = lt ? (Py_ssize_t)(lt - s) : n;
        if (allow_inline) {
            if ((rc = put_text(&raw, src, i, at)) != OK)
                goto done;
        } else if (skip_ws(src, i) < at) {
            rc = OUTSIDE;
            goto done;
        }
        i = at;
        if (i >= n) {
            if (close != NULL) { rc = OUTSIDE; goto done; }
            rc = flush_inline(&raw, out);
            *pos = i;
            goto done;
        }
        if (close != NULL && starts(src, i, close)) {
            rc = flush_inline(&raw, out);
            *pos = i + (Py_ssize_t)strlen(close);
            goto done;
        }
        int block = 1;
        long long first = 1;  /* an <ol>'s first number */
        Py_ssize_t after = -1; /* the index after a block's start tag */
        if (starts(src, i, "<p>")) {
            if ((rc = flush_inline(&raw, out)) != OK)
                goto done;
            i += 3;
            rc = parse_inline(src, &i, "</p>", &raw);
            if (rc == OK)
                rc = flush_inline(&raw, out);
        } else if (starts(src, i, "<pre") && tag_end(src, i + 1, "pre") >= 0) { /* <pre class="lang-py"> */
            if ((rc = flush_inline(&raw, out)) != OK)
                goto done;
            i = tag_end(src, i + 1, "pre");
            rc = render_pre(src, &i, out);
        } else if (starts(src, i, "<ul>") || starts(src, i, "<ol>") || (after = ol_start(src, i, &first)) >= 0) {
            if ((rc = flush_inline(&raw, out)) != OK)
                goto done;
            int ordered = s[i + 1] == 'o';
            if (s[i + 3] == '>') /* <ul> or <ol> */
                after = i + 4;
            i = after;
            rc = render_list(src, &i, ordered, first, depth, out);
        } else if (starts(src, i, "<blockquote>")) {
            if ((rc = flush_inline(&raw, out)) != OK)
                goto done;
            i += 12;
            rc = render_quote(src, &i, depth, out);
        } else if (starts(src, i, "<h") && i + 3 < n && s[i + 2] >= '1' && s[i + 2] <= '6' && s[i + 3] == '>') {
            if ((rc = flush_inline(&raw, out)) != OK)
                goto done;
            char hclose[6] = {'<', '/', 'h', s[i + 2], '>', 0};
            int level = s[i + 2] - '0';
            i += 4;
            rc = render_heading(src, &i, hclose, level, out);
        } else if (starts(src, i, "<hr>") || starts(src, i, "<hr/>") || starts(src, i, "<hr />")) {
            if ((rc = flush_inline(&raw, out)) != OK)
                goto done;
            i += s[i + 3] == '>' ? 4 : s[i + 3] == '/' ? 5 : 6;
            Block *rule = blocks_push(out, 0);
            if (rule == NULL || buf_put(&rule->text, "---", 3) < 0)
                rc = ERROR;
        } else if ((after = open_tag(src, i, "table")) >= 0) { /* <table class="s-table"> */
            if ((rc = flush_inline(&raw, out)) != OK)
                goto done;
            i = after;
            rc = render_table(src, &i, depth + 1, out);
        } else if ((after = open_tag(src, i, "div")) >= 0) { /* <div class="snippet"> */
            if ((rc = flush_inline(&raw, out)) != OK)
                goto done;
            i = after;
            rc = parse_flow(src, &i, "</div>", 1, depth + 1, out); /* its blocks, as the parent's own */
        } else {
            block = 0;
        }
        if (block) {
            if (rc != OK)
                goto done;
            continue;
        }
        if (!allow_inline) { rc = OUTSIDE; goto done; }
        /* inline content between blocks */
        if ((rc = inline_element(src, &i, &raw)) != OK)
            goto done;
    }
done:
    PyMem_Free(raw.data);
    return rc;
}

static int render_body(const Src *src, Buf *out) {
    int rc = check_chars(src);
    if (rc != OK)
        return rc;
    Blocks blocks = {0};
    if (memchr(src->s, '<', (size_t)src->n) == NULL) { /* plain text: one paragraph */
        Buf raw = {0};
        rc = put_text(&raw, src, 0, src->n);
        if (rc == OK)
            rc = flush_inline(&raw, &blocks);
        PyMem_Free(raw.data);
    } else {
        Py_ssize_t i = 0;
        rc = parse_flow(src, &i, NULL, 0, 0, &blocks);
    }
    if (rc == OK && join_blocks(&blocks, 0, out) < 0)
        rc = ERROR;
    blocks_free(&blocks);
    return rc;
}

static PyObject *render(PyObject *module, PyObject *arg) {
    (void)module;
    if (!PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "render() takes a str");
        return NULL;
    }
    Src src;
    src.s = PyUnicode_AsUTF8AndSize(arg, &src.n);
    if (src.s == NULL) { /* a lone surrogate: not UTF-8, libxml2's path decides */
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    Buf out = {0};
    int rc = render_body(&src, &out);
    PyObject *result;
    if (rc == ERROR) {
        result = PyErr_NoMemory();
    } else if (rc == OUTSIDE) {
        result = Py_NewRef(Py_None);
    } else {
        result = PyUnicode_DecodeUTF8(out.data ? out.data : "", out.len, "strict");
    }
    PyMem_Free(out.data);
    return result;
}

/* render() for C callers (the capsule ``render_utf8``; what it takes and returns: render_utf8.h). */

static int render_utf8(const char *html, Py_ssize_t n, char **text, Py_ssize_t *text_len) {
    Src src = {html, n};
    Buf out = {0};
    int rc = render_body(&src, &out);
    if (rc != OK) {
        PyMem_Free(out.data);
        return rc;
    }
    *text = out.data;
    *text_len = out.len;
    return OK;
}

static PyMethodDef methods[] = {
    {"render", render, METH_O,
     "render(html) -> str | None: html_to_text(html) for bodies in the fast subset, None for the rest."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fasthtml",
    .m_doc = "html_to_text for the common shapes of a post body, without libxml2 (see the top of _fasthtml.c).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fasthtml(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    RenderUtf8 fn = render_utf8;
    PyObject *capsule = PyCapsule_New((void *)fn, RENDER_UTF8_CAPSULE, NULL);
    if (capsule == NULL || PyModule_AddObject(m, "render_utf8", capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
