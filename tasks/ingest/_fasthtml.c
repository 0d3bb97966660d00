/*
 * alignflow.tasks.ingest._fasthtml: html_to_text for the common shapes of a post body, without libxml2.
 *
 * render(html: str) -> str | None
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
 *               | <ul> ws* (<li> flow </li> ws*)* </ul>    (<ol> likewise, numbered from 1)
 *               | <blockquote> flow </blockquote>
 *   flow       := (block | inline)*           (each run of inline content is a paragraph)
 *   inline     := (text | <code> code </code> | <T attrs> | </T attrs>)*   T in a em strong b i
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

static int buf_char(Buf *b, char c) { return buf_put(b, &c, 1); }

/* Result of a parsing step: OK, OUTSIDE (not in the subset: return None), ERROR (MemoryError). */
enum { OK = 0, OUTSIDE = 1, ERROR = -1 };

typedef struct {
    const char *s;
    Py_ssize_t n;
} Src;

static int starts(const Src *src, Py_ssize_t i, const char *lit) {
    Py_ssize_t k = (Py_ssize_t)strlen(lit);
    return i + k <= src->n && memcmp(src->s + i, lit, (size_t)k) == 0;
}

static int is_ws(char c) { return c == ' ' || c == '\t' || c == '\n'; }

/* Check every character once: controls, C1, non-characters and the Unicode spaces the renderer treats
 * apart are outside the subset. UTF-8 from CPython is valid, so lead bytes tell the length. */
static int check_chars(const Src *src) {
    const unsigned char *s = (const unsigned char *)src->s;
    Py_ssize_t n = src->n;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c < 0x80) {
            if ((c < 0x20 && c != '\t' && c != '\n') || c == 0x7f)
                return OUTSIDE;
        } else if (c == 0xC2) {
            if (i + 1 < n && s[i + 1] < 0xA0) /* U+0080..U+009F: C1 controls (U+0085 among them) */
                return OUTSIDE;
        } else if (c == 0xE1) {
            if (i + 2 < n && s[i + 1] == 0x9A && s[i + 2] == 0x80) /* U+1680 */
                return OUTSIDE;
        } else if (c == 0xE2) {
            if (i + 2 < n && s[i + 1] == 0x80 && (s[i + 2] <= 0x8A || s[i + 2] == 0xA8 || s[i + 2] == 0xA9 ||
                                                   s[i + 2] == 0xAF)) /* U+2000..200A, 2028, 2029, 202F */
                return OUTSIDE;
            if (i + 2 < n && s[i + 1] == 0x81 && s[i + 2] == 0x9F) /* U+205F */
                return OUTSIDE;
        } else if (c == 0xE3) {
            if (i + 2 < n && s[i + 1] == 0x80 && s[i + 2] == 0x80) /* U+3000 */
                return OUTSIDE;
        } else if (c == 0xEF) {
            if (i + 2 < n && s[i + 1] == 0xBB && s[i + 2] == 0xBF) /* U+FEFF, which libxml2 may take for a BOM */
                return OUTSIDE;
            if (i + 2 < n && s[i + 1] == 0xB7 && s[i + 2] >= 0x90 && s[i + 2] <= 0xAF) /* U+FDD0..FDEF */
                return OUTSIDE;
            if (i + 2 < n && s[i + 1] == 0xBF && (s[i + 2] == 0xBE || s[i + 2] == 0xBF)) /* U+FFFE, U+FFFF */
                return OUTSIDE;
        }
    }
    return OK;
}

/* Append the text s[i:end] (no '<' in it) with its entities decoded. */
static int put_text(Buf *out, const Src *src, Py_ssize_t i, Py_ssize_t end) {
    const char *s = src->s;
    while (i < end) {
        const char *amp = memchr(s + i, '&', (size_t)(end - i));
        Py_ssize_t stop = amp ? (Py_ssize_t)(amp - s) : end;
        if (buf_put(out, s + i, stop - i) < 0)
            return ERROR;
        if (!amp)
            return OK;
        i = stop;
        static const struct { const char *name; const char *value; } entities[] = {
            {"&amp;", "&"}, {"&lt;", "<"}, {"&gt;", ">"}, {"&quot;", "\""}, {"&#39;", "'"}, {"&nbsp;", "\xc2\xa0"},
        };
        int found = 0;
        for (size_t k = 0; k < sizeof entities / sizeof entities[0]; k++) {
            Py_ssize_t len = (Py_ssize_t)strlen(entities[k].name);
            if (i + len <= end && memcmp(s + i, entities[k].name, (size_t)len) == 0) {
                if (buf_put(out, entities[k].value, (Py_ssize_t)strlen(entities[k].value)) < 0)
                    return ERROR;
                i += len;
                found = 1;
                break;
            }
        }
        if (!found)
            return OUTSIDE;
    }
    return OK;
}

/* Whitespace as the renderer collapses it: ' ', '\t', '\n' and U+00A0 (the other Unicode spaces are
 * outside the subset). Returns the length of the whitespace character at s[i], 0 if none. */
static Py_ssize_t ws_len(const char *s, Py_ssize_t i, Py_ssize_t n) {
    if (is_ws(s[i]))
        return 1;
    if ((unsigned char)s[i] == 0xC2 && i + 1 < n && (unsigned char)s[i + 1] == 0xA0)
        return 2;
    return 0;
}

/* _flush's whitespace rule: runs of whitespace in raw[0:len] become one space, none at either end. */
static int collapse_ws(Buf *dst, const char *raw, Py_ssize_t len) {
    Py_ssize_t body = dst->len;
    int pending_space = 0;
    for (Py_ssize_t i = 0; i < len;) {
        Py_ssize_t w = ws_len(raw, i, len);
        if (w) {
            pending_space = 1;
            i += w;
            continue;
        }
        if (pending_space && dst->len > body && buf_char(dst, ' ') < 0)
            return ERROR;
        pending_space = 0;
        if (buf_char(dst, raw[i]) < 0)
            return ERROR;
        i++;
    }
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

/* Attributes from s[j] (just after a tag name) to the tag's '>': ([ \t\n]+ name="value")* [ \t\n]* '>'.
 * Returns the index after '>', or -1 when they are not of that form. */
static Py_ssize_t attrs_end(const Src *src, Py_ssize_t j) {
    const char *s = src->s;
    Py_ssize_t n = src->n;
    for (;;) {
        Py_ssize_t k = j;
        while (k < n && is_ws(s[k]))
            k++;
        if (k < n && s[k] == '>')
            return k + 1;
        if (k == j || k >= n || !(s[k] >= 'a' && s[k] <= 'z'))
            return -1;
        while (k < n && ((s[k] >= 'a' && s[k] <= 'z') || (s[k] >= '0' && s[k] <= '9') || s[k] == '-'))
            k++;
        if (k + 1 >= n || s[k] != '=' || s[k + 1] != '"')
            return -1;
        k += 2;
        while (k < n && s[k] != '"' && s[k] != '<' && s[k] != '>')
            k++;
        if (k >= n || s[k] != '"')
            return -1;
        j = k + 1;
    }
}

/* The tag `name` at s[i] (just after '<' or '</') with its attributes: the index after its '>', or -1. */
static Py_ssize_t tag_end(const Src *src, Py_ssize_t i, const char *name) {
    Py_ssize_t len = (Py_ssize_t)strlen(name);
    if (i + len < src->n && memcmp(src->s + i, name, (size_t)len) == 0 &&
        (is_ws(src->s[i + len]) || src->s[i + len] == '>'))
        return attrs_end(src, i + len);
    return -1;
}

/* A tag of the inline set (a em strong b i) at s[i], just after '<' or '</': the index after '>', or -1. */
static Py_ssize_t inline_tag_end(const Src *src, Py_ssize_t i) {
    static const char *names[] = {"strong", "em", "a", "b", "i"};
    for (size_t k = 0; k < sizeof names / sizeof names[0]; k++) {
        Py_ssize_t end = tag_end(src, i, names[k]);
        if (end >= 0)
            return end;
    }
    return -1;
}

/* Inline content from s[*pos] up to the closing literal `close` (e.g. "</p>"): rendered into `raw`
 * (text decoded, inline code rendered), *pos moved past `close`. */
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
        if (starts(src, i, "<code>")) {
            Py_ssize_t c = i + 6;
            const char *lt2 = memchr(s + c, '<', (size_t)(n - c));
            if (!lt2)
                return OUTSIDE;
            Py_ssize_t e = (Py_ssize_t)(lt2 - s);
            if (!starts(src, e, "</code>"))
                return OUTSIDE;
            Buf code = {0};
            rc = put_text(&code, src, c, e);
            if (rc == OK)
                rc = put_inline_code(raw, code.data ? code.data : "", code.len);
            PyMem_Free(code.data);
            if (rc != OK)
                return rc;
            i = e + 7;
            continue;
        }
        Py_ssize_t end = inline_tag_end(src, i + 1 + (i + 1 < n && s[i + 1] == '/'));
        if (end < 0)
            return OUTSIDE;
        i = end;
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

static void blocks_drop_last(Blocks *b) {
    b->n--;
    PyMem_Free(b->v[b->n].text.data);
}

/* _flush: the pending inline text, whitespace collapsed, as one more block (none if it is empty). */
static int flush_inline(Buf *raw, Blocks *out) {
    if (raw->len == 0)
        return OK;
    Block *block = blocks_push(out, 0);
    if (block == NULL || collapse_ws(&block->text, raw->data, raw->len) < 0)
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

/* <ul>/<ol>: each <li>'s blocks joined as an item, prefixed by its marker; the items one per line. */
static int render_list(const Src *src, Py_ssize_t *pos, int ordered, int depth, Blocks *out) {
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
            int mlen = ordered ? snprintf(marker, sizeof marker, "%d. ", nitems + 1) : snprintf(marker, sizeof marker, "- ");
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
    if (nitems) {
        Block *block = blocks_push(out, 1);
        if (block == NULL || buf_put(&block->text, items.data, items.len) < 0)
            rc = ERROR;
    }
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

/* <hN>: _HEADINGS[tag] + its text ("## " for <h2>); nothing for an empty heading. */
static int render_heading(const Src *src, Py_ssize_t *pos, const char *close, int level, Blocks *out) {
    Buf raw = {0}, text = {0};
    int rc = parse_inline(src, pos, close, &raw);
    if (rc == OK && collapse_ws(&text, raw.data ? raw.data : "", raw.len) < 0)
        rc = ERROR;
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
        } else if (starts(src, i, "<ul>") || starts(src, i, "<ol>")) {
            if ((rc = flush_inline(&raw, out)) != OK)
                goto done;
            int ordered = s[i + 1] == 'o';
            i += 4;
            rc = render_list(src, &i, ordered, depth, out);
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
        } else {
            block = 0;
        }
        if (block) {
            if (rc != OK)
                goto done;
            continue;
        }
        if (!allow_inline) { rc = OUTSIDE; goto done; }
        /* inline content between blocks: <code>text</code>, or an inline tag */
        if (starts(src, i, "<code>")) {
            Py_ssize_t c = i + 6;
            const char *lt2 = memchr(s + c, '<', (size_t)(n - c));
            Py_ssize_t e = lt2 ? (Py_ssize_t)(lt2 - s) : -1;
            if (e < 0 || !starts(src, e, "</code>")) { rc = OUTSIDE; goto done; }
            Buf code = {0};
            rc = put_text(&code, src, c, e);
            if (rc == OK)
                rc = put_inline_code(&raw, code.data ? code.data : "", code.len);
            PyMem_Free(code.data);
            if (rc != OK)
                goto done;
            i = e + 7;
            continue;
        }
        Py_ssize_t end = inline_tag_end(src, i + 1 + (i + 1 < n && s[i + 1] == '/'));
        if (end < 0) { rc = OUTSIDE; goto done; }
        i = end;
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

static PyMethodDef methods[] = {
    {"render", render, METH_O,
     "render(html) -> str | None: html_to_text(html) for bodies in the fast subset, None for the rest."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fasthtml", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fasthtml(void) { return PyModule_Create(&module); }
