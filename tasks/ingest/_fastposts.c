/*
 * alignflow.tasks.ingest._fastposts: Posts.xml rows read from their bytes, without libxml2, into the SQLite
 * image a reading worker hands the parent (store.shard_image's tables, filled without a Python object per row).
 *
 * shard = open_shard(posts_columns, votes_columns)     an in-memory database with the store's two tables
 * scan_posts(shard, data, line, site, label, max_chars, max_row_bytes, render, odd[, direct])
 *                                                       -> (skipped, rows, secs) | None
 * image = finish_shard(shard)                           its bytes (sqlite3_serialize)
 *
 * ``data`` holds the rows of a Posts.xml range (after its prolog, before its closing tag), ending before a
 * '<' or at the range's end; ``line`` is the number of its first line. It must be plain rows, in the form the
 * dumps write, separated by white space: one row per line as in the dumps, or several on a line, as an XML
 * library writes a table (no newline between elements):
 *
 *   data   := gap (row gap)*                 gap := (" " | "\t" | "\n" | "\r\n")*
 *   row    := "<row" (" "+ name "=" ("\"" value "\"" | "'" value' "'"))+ " "* "/>"
 *   name   := [A-Za-z][A-Za-z0-9]*, not starting with "xml" (any case), each name once per row
 *   value  := UTF-8 text without '<', '"' or a control character (U+0000..U+001F) (value': without '\''
 *             instead of '"', as some XML libraries quote values), whose characters are
 *             XML characters (no U+FFFE, U+FFFF), with the references &lt; &gt; &amp; &quot; &apos; &#N; &#xH;
 *             to XML characters
 *
 * Such a row is well formed and means the same to any XML parser: its attributes are exactly the
 * values above with their references replaced. A row's line is the line it starts on (a lone "\r", which
 * XML counts as a line end, is not plain). If one row is not plain, or is longer than max_row_bytes as
 * the parser's path measures it (from its '<' to the next '<' or the end of ``data``), None comes back and
 * the whole range goes to libxml2 (ranges.read_range), which decides what the row means or which error it
 * is; the shard is then dropped.
 *
 * A plain row is inserted as stackexchange.PostRowReader and store.post_row make it, when it takes none
 * of the reader's checks' other branches:
 *   Id and (answers) ParentId: 1 to 18 ASCII digits; PostTypeId 1 or 2; Score: -?[0-9]{1,18};
 *   a question's title not empty once its whitespace runs are collapsed, without a non-ASCII space;
 *   an answer's body not empty once rendered; a body of at most max_chars characters once rendered.
 * A row with another PostTypeId of ASCII digits is counted in ``skipped`` (by its PostTypeId) and
 * ``rows``. Any other row is "odd": ``odd(attributes, line)`` (a dict, in document order) runs the reader
 * itself and returns the store row to insert in its place, or None. Bodies are rendered by calling
 * ``render`` (clean.html_to_text); ``secs`` is the time spent in it. ``direct``: None, or _fasthtml's capsule
 * ``render_utf8`` (what html_to_text calls first), called on the body's bytes with no Python str made either
 * way; a body it leaves (outside its subset) goes to ``render``, and so does a blank one (str.isspace).
 * tests/test_fast_posts.py reads generated, mutated and real rows both ways and requires the same result.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include <sqlite3.h>

#include "render_utf8.h" /* _fasthtml's renderer for C callers; OK, OUTSIDE and ERROR */

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define MAX_ATTRS 64

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Buf;

static int buf_put(Buf *b, const char *s, Py_ssize_t n) {
    if (b->len + n > b->cap) {
        Py_ssize_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        char *data = PyMem_Realloc(b->data, (size_t)cap);
        if (data == NULL)
            return -1;
        b->data = data;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, (size_t)n);
    b->len += n;
    return 0;
}

typedef struct {
    const char *name;
    Py_ssize_t name_len;
    Py_ssize_t off, len; /* the decoded value in the line's buffer */
} Attr;

typedef struct {
    Attr attrs[MAX_ATTRS];
    int n;
    Buf values;
} Row;

static int xml_char(unsigned long cp) {
    return cp == 0x9 || cp == 0xA || cp == 0xD || (cp >= 0x20 && cp <= 0xD7FF) || (cp >= 0xE000 && cp <= 0xFFFD) ||
           (cp >= 0x10000 && cp <= 0x10FFFF);
}

/* Length of the valid UTF-8 sequence at s (< end) encoding an XML character, else 0; its code point. */
static int utf8_at(const unsigned char *s, const unsigned char *end, unsigned long *cp) {
    unsigned char c = s[0];
    int n;
    unsigned long v, min;
    if (c < 0x80) {
        *cp = c;
        return 1;
    } else if (c >= 0xC2 && c <= 0xDF) {
        n = 2, v = c & 0x1F, min = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3, v = c & 0x0F, min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4, v = c & 0x07, min = 0x10000;
    } else {
        return 0;
    }
    if (end - s < n)
        return 0;
    for (int i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        v = (v << 6) | (s[i] & 0x3F);
    }
    if (v < min || (v >= 0xD800 && v <= 0xDFFF) || !xml_char(v))
        return 0;
    *cp = v;
    return n;
}

static int put_cp(Buf *b, unsigned long cp) {
    char out[4];
    int n;
    if (cp < 0x80) {
        out[0] = (char)cp, n = 1;
    } else if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6)), out[1] = (char)(0x80 | (cp & 0x3F)), n = 2;
    } else if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12)), out[1] = (char)(0x80 | ((cp >> 6) & 0x3F)),
        out[2] = (char)(0x80 | (cp & 0x3F)), n = 3;
    } else {
        out[0] = (char)(0xF0 | (cp >> 18)), out[1] = (char)(0x80 | ((cp >> 12) & 0x3F)),
        out[2] = (char)(0x80 | ((cp >> 6) & 0x3F)), out[3] = (char)(0x80 | (cp & 0x3F)), n = 4;
    }
    return buf_put(b, out, n);
}

/* A reference at s ('&'): its length, and its character in *cp; 0 if not one of a plain value's. */
static Py_ssize_t reference(const char *s, const char *end, unsigned long *cp) {
    static const struct {
        const char *text;
        int len;
        char c;
    } named[] = {{"&lt;", 4, '<'}, {"&gt;", 4, '>'}, {"&amp;", 5, '&'}, {"&quot;", 6, '"'}, {"&apos;", 6, '\''}};
    for (size_t i = 0; i < sizeof named / sizeof named[0]; i++) {
        if (end - s >= named[i].len && memcmp(s, named[i].text, (size_t)named[i].len) == 0) {
            *cp = (unsigned char)named[i].c;
            return named[i].len;
        }
    }
    if (end - s < 4 || s[1] != '#')
        return 0;
    const char *p = s + 2;
    int hex = *p == 'x';
    if (hex)
        p++;
    unsigned long v = 0;
    const char *digits = p;
    while (p < end && p - digits < 8) {
        char c = *p;
        int d = c >= '0' && c <= '9' ? c - '0'
                : hex && c >= 'a' && c <= 'f' ? c - 'a' + 10
                : hex && c >= 'A' && c <= 'F' ? c - 'A' + 10
                : -1;
        if (d < 0)
            break;
        v = v * (hex ? 16 : 10) + (unsigned long)d;
        p++;
    }
    if (p == digits || p >= end || *p != ';' || !xml_char(v))
        return 0;
    *cp = v;
    return p + 1 - s;
}

static int name_char(char c, int first) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (!first && c >= '0' && c <= '9');
}


/* The first byte of [p, end) that ends a run of plain value characters of a value quoted by ``q`` ('"' or '\'';
 * printable ASCII other than ``q``, '&' and '<'): a control character, a non-ASCII byte, ``q``, '&' or '<'; end if
 * none. Sixteen bytes at a time where the CPU has SSE2 (every x86-64): a signed compare with 0x20 finds both the
 * control characters and the bytes from 0x80 (negative as signed). */
static const char *plain_run_end(const char *p, const char *end, char q) {
#if defined(__SSE2__)
    const __m128i space = _mm_set1_epi8(0x20), quote = _mm_set1_epi8(q), amp = _mm_set1_epi8('&'),
                  lt = _mm_set1_epi8('<');
    while (end - p >= 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)p);
        __m128i stop = _mm_or_si128(_mm_or_si128(_mm_cmplt_epi8(v, space), _mm_cmpeq_epi8(v, quote)),
                                    _mm_or_si128(_mm_cmpeq_epi8(v, amp), _mm_cmpeq_epi8(v, lt)));
        int mask = _mm_movemask_epi8(stop);
        if (mask)
            return p + __builtin_ctz((unsigned)mask);
        p += 16;
    }
#endif
    while (p < end && (unsigned char)*p >= 0x20 && (unsigned char)*p < 0x80 && *p != q && *p != '&' && *p != '<')
        p++;
    return p;
}

/* Parse the row that starts at p (its "<row"), ending before ``end``, into row; 1 if plain (*after: the byte
 * after its "/>"), 0 if not, -1 on memory error. */
static int parse_row(const char *p, const char *end, Row *row, const char **after) {
    row->n = 0;
    row->values.len = 0;
    if (end - p < 4 || memcmp(p, "<row", 4) != 0)
        return 0;
    p += 4;
    for (;;) {
        const char *gap = p;
        while (p < end && *p == ' ')
            p++;
        if (end - p >= 2 && p[0] == '/' && p[1] == '>') {
            *after = p + 2;
            return row->n > 0;
        }
        if (p == gap || p >= end || !name_char(*p, 1))
            return 0;
        const char *name = p;
        while (p < end && name_char(*p, 0))
            p++;
        Py_ssize_t name_len = p - name;
        if (name_len >= 3 && (name[0] | 0x20) == 'x' && (name[1] | 0x20) == 'm' && (name[2] | 0x20) == 'l')
            return 0;
        for (int i = 0; i < row->n; i++)
            if (row->attrs[i].name_len == name_len && memcmp(row->attrs[i].name, name, (size_t)name_len) == 0)
                return 0;
        if (row->n == MAX_ATTRS || end - p < 2 || p[0] != '=' || (p[1] != '"' && p[1] != '\''))
            return 0;
        const char q = p[1]; /* either quote, as XML allows: the other one may then stand in the value */
        p += 2;
        Attr *a = &row->attrs[row->n++];
        a->name = name;
        a->name_len = name_len;
        a->off = row->values.len;
        for (;;) {
            const char *run = p;
            p = plain_run_end(p, end, q);
            if (p > run && buf_put(&row->values, run, p - run) < 0)
                return -1;
            if (p >= end)
                return 0;
            if (*p == q) {
                p++;
                break;
            }
            unsigned long cp;
            if (*p == '&') {
                Py_ssize_t n = reference(p, end, &cp);
                if (!n)
                    return 0;
                if (put_cp(&row->values, cp) < 0)
                    return -1;
                p += n;
            } else if ((unsigned char)*p >= 0x80) {
                int n = utf8_at((const unsigned char *)p, (const unsigned char *)end, &cp);
                if (!n)
                    return 0;
                if (buf_put(&row->values, p, n) < 0)
                    return -1;
                p += n;
            } else {
                return 0; /* '<' or a control character */
            }
        }
        a->len = row->values.len - a->off;
    }
}

static const Attr *get(const Row *row, const char *name) {
    size_t n = strlen(name);
    for (int i = 0; i < row->n; i++)
        if ((size_t)row->attrs[i].name_len == n && memcmp(row->attrs[i].name, name, n) == 0)
            return &row->attrs[i];
    return NULL;
}

static const char *value(const Row *row, const Attr *a) { return row->values.data + a->off; }

static int plain_digits(const char *s, Py_ssize_t n) {
    if (n < 1 || n > 18)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return 0;
    return 1;
}

/* -?[0-9]{1,18} (checked) as a number. */
static long long score_of(const char *s, Py_ssize_t n) {
    int neg = n > 0 && s[0] == '-';
    long long v = 0;
    for (Py_ssize_t i = neg; i < n; i++)
        v = v * 10 + (s[i] - '0');
    return neg ? -v : v;
}

static PyObject *str_of(const Row *row, const Attr *a) {
    return a ? PyUnicode_DecodeUTF8(value(row, a), a->len, "strict") : PyUnicode_FromStringAndSize("", 0);
}

/* The runs of text between separators (``is_sep``), the non-empty ones joined by ``joiner``, after out. */
static int split_join(const char *text, Py_ssize_t n, int (*is_sep)(unsigned char), char joiner, Buf *out) {
    const unsigned char *s = (const unsigned char *)text;
    Py_ssize_t i = 0;
    while (i < n) {
        while (i < n && is_sep(s[i]))
            i++;
        Py_ssize_t start = i;
        while (i < n && !is_sep(s[i]))
            i++;
        if (i > start) {
            if (out->len && buf_put(out, &joiner, 1) < 0)
                return -1;
            if (buf_put(out, text + start, i - start) < 0)
                return -1;
        }
    }
    return 0;
}

static int ascii_space(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f' || (c >= 0x1C && c <= 0x1F);
}

/* A non-ASCII character str.split() separates on (U+0085, U+00A0, U+1680, U+2000..U+200A, U+2028, U+2029,
   U+202F, U+205F, U+3000) starting at s[i]. */
static int other_space(const unsigned char *s, Py_ssize_t i, Py_ssize_t n) {
    unsigned char c = s[i];
    if (c == 0xC2 && i + 1 < n)
        return s[i + 1] == 0x85 || s[i + 1] == 0xA0;
    if (i + 2 >= n)
        return 0;
    unsigned char b = s[i + 1], d = s[i + 2];
    return (c == 0xE1 && b == 0x9A && d == 0x80) ||
           (c == 0xE2 && b == 0x80 && (d <= 0x8A || d == 0xA8 || d == 0xA9 || d == 0xAF)) ||
           (c == 0xE2 && b == 0x81 && d == 0x9F) || (c == 0xE3 && b == 0x80 && d == 0x80);
}

/* " ".join(title.split()) into out; *ok = 0 (and out unfinished) if the title holds a non-ASCII space. */
static int collapse_title(const char *text, Py_ssize_t n, Buf *out, int *ok) {
    const unsigned char *s = (const unsigned char *)text;
    out->len = 0;
    *ok = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (s[i] >= 0x80 && other_space(s, i, n)) {
            *ok = 0;
            return 0;
        }
    }
    return split_join(text, n, ascii_space, ' ', out);
}

static int tag_separator(unsigned char c) { return c == '<' || c == '>' || c == '|'; }

/* tags split on runs of '<', '>' and '|', the non-empty parts joined by '|'. */
static int join_tags(const char *s, Py_ssize_t n, Buf *out) {
    out->len = 0;
    return split_join(s, n, tag_separator, '|', out);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* -- the shard: an in-memory SQLite database, its posts inserted in order ----------------------------- */

typedef struct {
    sqlite3 *db;
    sqlite3_stmt *insert;
    int columns;
} Shard;

static const char *SHARD = "alignflow.tasks.ingest._fastposts.Shard";

static void shard_free(Shard *s) {
    if (s == NULL)
        return;
    sqlite3_finalize(s->insert);
    sqlite3_close(s->db);
    PyMem_Free(s);
}

static void shard_capsule_free(PyObject *capsule) {
    shard_free(PyCapsule_GetPointer(capsule, SHARD));
}

static PyObject *sqlite_error(sqlite3 *db, const char *what) {
    PyErr_Format(PyExc_RuntimeError, "%s: %s", what, db ? sqlite3_errmsg(db) : "out of memory");
    return NULL;
}

static PyObject *open_shard(PyObject *module, PyObject *args) {
    (void)module;
    const char *posts_types, *votes_types;
    if (!PyArg_ParseTuple(args, "ss:open_shard", &posts_types, &votes_types))
        return NULL;
    Shard *s = PyMem_Calloc(1, sizeof(Shard));
    if (s == NULL)
        return PyErr_NoMemory();
    if (sqlite3_open(":memory:", &s->db) != SQLITE_OK) {
        sqlite_error(s->db, "open_shard");
        shard_free(s);
        return NULL;
    }
    s->columns = 1;
    for (const char *c = posts_types; *c; c++)
        s->columns += *c == ',';
    PyObject *sql = PyUnicode_FromFormat("PRAGMA page_size=65536; CREATE TABLE posts (%s); CREATE TABLE votes (%s); "
                                         "BEGIN",
                                         posts_types, votes_types);
    PyObject *insert = PyUnicode_FromString("INSERT INTO posts VALUES (?");
    for (int i = 1; insert && i < s->columns; i++)
        PyUnicode_AppendAndDel(&insert, PyUnicode_FromString(",?"));
    if (insert)
        PyUnicode_AppendAndDel(&insert, PyUnicode_FromString(")"));
    if (sql == NULL || insert == NULL) {
        Py_XDECREF(sql);
        Py_XDECREF(insert);
        shard_free(s);
        return NULL;
    }
    int rc = sqlite3_exec(s->db, PyUnicode_AsUTF8(sql), NULL, NULL, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_prepare_v2(s->db, PyUnicode_AsUTF8(insert), -1, &s->insert, NULL);
    Py_DECREF(sql);
    Py_DECREF(insert);
    if (rc != SQLITE_OK) {
        sqlite_error(s->db, "open_shard");
        shard_free(s);
        return NULL;
    }
    PyObject *capsule = PyCapsule_New(s, SHARD, shard_capsule_free);
    if (capsule == NULL)
        shard_free(s);
    return capsule;
}

static PyObject *finish_shard(PyObject *module, PyObject *capsule) {
    (void)module;
    Shard *s = PyCapsule_GetPointer(capsule, SHARD);
    if (s == NULL)
        return NULL;
    if (sqlite3_exec(s->db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK)
        return sqlite_error(s->db, "finish_shard");
    sqlite3_int64 size = 0;
    unsigned char *image = sqlite3_serialize(s->db, "main", &size, 0);
    if (image == NULL)
        return sqlite_error(s->db, "finish_shard");
    PyObject *bytes = PyBytes_FromStringAndSize((const char *)image, (Py_ssize_t)size);
    sqlite3_free(image);
    return bytes;
}

static int bind_text(Shard *s, int i, const char *text, Py_ssize_t n) {
    return sqlite3_bind_text(s->insert, i, text ? text : "", (int)n, SQLITE_TRANSIENT) == SQLITE_OK ? 0 : -1;
}

static int step(Shard *s) {
    int rc = sqlite3_step(s->insert);
    sqlite3_reset(s->insert);
    sqlite3_clear_bindings(s->insert);
    if (rc != SQLITE_DONE) {
        sqlite_error(s->db, "scan_posts: insert");
        return -1;
    }
    return 0;
}

/* A store row made in Python (the reader's, for an odd row): its values bound as executemany binds them. */
static int insert_tuple(Shard *s, PyObject *row) {
    if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != s->columns) {
        PyErr_SetString(PyExc_TypeError, "scan_posts: odd() must return a store row (a tuple) or None");
        return -1;
    }
    for (int i = 0; i < s->columns; i++) {
        PyObject *v = PyTuple_GET_ITEM(row, i);
        int rc;
        if (v == Py_None) {
            rc = sqlite3_bind_null(s->insert, i + 1);
        } else if (PyLong_Check(v)) {
            long long x = PyLong_AsLongLong(v);
            if (x == -1 && PyErr_Occurred())
                return -1;
            rc = sqlite3_bind_int64(s->insert, i + 1, x);
        } else if (PyFloat_Check(v)) {
            rc = sqlite3_bind_double(s->insert, i + 1, PyFloat_AS_DOUBLE(v));
        } else if (PyUnicode_Check(v)) {
            Py_ssize_t n;
            const char *text = PyUnicode_AsUTF8AndSize(v, &n);
            if (text == NULL)
                return -1;
            rc = sqlite3_bind_text(s->insert, i + 1, text, (int)n, SQLITE_TRANSIENT);
        } else {
            PyErr_Format(PyExc_TypeError, "scan_posts: a store row holds a %s", Py_TYPE(v)->tp_name);
            return -1;
        }
        if (rc != SQLITE_OK) {
            sqlite_error(s->db, "scan_posts: bind");
            return -1;
        }
    }
    return step(s);
}

typedef struct {
    Shard *shard;
    const char *site, *label;
    Py_ssize_t site_len, label_len, max_chars;
    PyObject *render;
    RenderUtf8 direct; /* NULL: every body through render */
    Buf title, tags, author;
    double render_seconds;
} Ctx;

/* Whether html_to_text takes the body for blank without rendering it: empty, or every character whitespace as
 * str.isspace() says (valid UTF-8: parse_row checked it). */
static int blank(const char *s, Py_ssize_t n) {
    const unsigned char *p = (const unsigned char *)s, *end = p + n;
    while (p < end) {
        unsigned long cp;
        int k = *p < 0x80 ? 1 : utf8_at(p, end, &cp);
        if (k == 1)
            cp = *p;
        if (k == 0 || !Py_UNICODE_ISSPACE((Py_UCS4)cp))
            return 0;
        p += k;
    }
    return 1;
}

/* The characters of valid UTF-8: its bytes that do not continue a character. */
static Py_ssize_t utf8_chars(const char *s, Py_ssize_t n) {
    Py_ssize_t chars = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        chars += ((unsigned char)s[i] & 0xC0) != 0x80;
    return chars;
}

/* Insert the row's store row; *counted = 0 (nothing inserted) for an odd row. -1 on error. */
static int post_of(Ctx *cx, const Row *row, long long line, PyObject *skipped, int *counted) {
    *counted = 0;
    const Attr *id = get(row, "Id"), *type = get(row, "PostTypeId");
    if (!id || !plain_digits(value(row, id), id->len) || !type || !plain_digits(value(row, type), type->len))
        return 0;
    const char *t = value(row, type);
    int is_question = type->len == 1 && t[0] == '1', is_answer = type->len == 1 && t[0] == '2';
    if (!is_question && !is_answer) {
        PyObject *key = PyUnicode_FromStringAndSize(t, type->len);
        if (key == NULL)
            return -1;
        PyObject *was = PyDict_GetItemWithError(skipped, key);
        long n = was ? PyLong_AsLong(was) : 0;
        PyObject *now_n = (was || !PyErr_Occurred()) ? PyLong_FromLong(n + 1) : NULL;
        int rc = now_n ? PyDict_SetItem(skipped, key, now_n) : -1;
        Py_XDECREF(now_n);
        Py_DECREF(key);
        if (rc < 0)
            return -1;
        *counted = 1;
        return 0;
    }
    const Attr *score = get(row, "Score");
    if (!score)
        return 0;
    const char *sv = value(row, score);
    int neg = score->len > 0 && sv[0] == '-';
    if (!plain_digits(sv + neg, score->len - neg))
        return 0;
    const Attr *parent = NULL, *title = NULL;
    if (is_question) {
        title = get(row, "Title");
        if (!title)
            return 0;
        int ok;
        if (collapse_title(value(row, title), title->len, &cx->title, &ok) < 0)
            return -1;
        if (!ok || cx->title.len == 0)
            return 0;
    } else {
        parent = get(row, "ParentId");
        if (!parent || !plain_digits(value(row, parent), parent->len))
            return 0;
    }
    /* the body, rendered: in C where the direct renderer takes it, else by render() on a str */
    const Attr *body_attr = get(row, "Body");
    PyObject *body = NULL; /* render()'s str, or NULL: the text is in ``owned`` */
    char *owned = NULL;
    const char *body_text = NULL;
    Py_ssize_t body_len = 0, chars = 0;
    double t0 = now();
    int rc = OUTSIDE;
    if (cx->direct != NULL && body_attr && !blank(value(row, body_attr), body_attr->len)) {
        rc = cx->direct(value(row, body_attr), body_attr->len, &owned, &body_len);
        if (rc == ERROR) {
            PyErr_NoMemory();
            return -1;
        }
    }
    if (rc == OK) {
        body_text = owned ? owned : "";
        chars = utf8_chars(body_text, body_len);
    } else {
        PyObject *raw_body = str_of(row, body_attr);
        if (raw_body == NULL)
            return -1;
        body = PyObject_CallOneArg(cx->render, raw_body);
        Py_DECREF(raw_body);
        if (body == NULL)
            return -1;
        if (!PyUnicode_Check(body)) {
            Py_DECREF(body);
            PyErr_SetString(PyExc_TypeError, "scan_posts: render() must return a str");
            return -1;
        }
        chars = PyUnicode_GET_LENGTH(body);
    }
    cx->render_seconds += now() - t0;
    if ((is_answer && chars == 0) || chars > cx->max_chars) {
        Py_XDECREF(body);
        PyMem_Free(owned);
        return 0;
    }
    if (body != NULL && (body_text = PyUnicode_AsUTF8AndSize(body, &body_len)) == NULL)
        goto fail;
    /* author: user:<OwnerUserId>, else name:<OwnerDisplayName>, else empty */
    const Attr *owner = get(row, "OwnerUserId"), *display = get(row, "OwnerDisplayName");
    cx->author.len = 0;
    if (owner && owner->len) {
        if (buf_put(&cx->author, "user:", 5) < 0 || buf_put(&cx->author, value(row, owner), owner->len) < 0)
            goto fail;
    } else if (display && display->len) {
        if (buf_put(&cx->author, "name:", 5) < 0 || buf_put(&cx->author, value(row, display), display->len) < 0)
            goto fail;
    }
    const Attr *tags = get(row, "Tags");
    if (join_tags(tags ? value(row, tags) : "", tags ? tags->len : 0, &cx->tags) < 0)
        goto fail;
    const char *qid = is_question ? value(row, id) : value(row, parent);
    Py_ssize_t qid_len = is_question ? id->len : parent->len;
    char pkey[20], qkey[20];
    memset(pkey, '0', 20);
    memcpy(pkey + 20 - id->len, value(row, id), (size_t)id->len);
    memset(qkey, '0', 20);
    memcpy(qkey + 20 - qid_len, qid, (size_t)qid_len);
    const Attr *accepted = is_question ? get(row, "AcceptedAnswerId") : NULL;
    const Attr *license = get(row, "ContentLicense"), *created = get(row, "CreationDate");
    Shard *s = cx->shard;
    sqlite3_stmt *st = s->insert;
    int bad = bind_text(s, 1, cx->site, cx->site_len) || bind_text(s, 2, "stackexchange", 13) ||
              bind_text(s, 3, value(row, id), id->len) || bind_text(s, 4, pkey, 20) ||
              bind_text(s, 5, is_question ? "question" : "answer", is_question ? 8 : 6) ||
              sqlite3_bind_int64(st, 6, is_question ? 0 : 1) != SQLITE_OK || bind_text(s, 7, qid, qid_len) ||
              bind_text(s, 8, qkey, 20) ||
              bind_text(s, 9, is_question ? cx->title.data : "", is_question ? cx->title.len : 0) ||
              bind_text(s, 10, body_text, body_len) || bind_text(s, 11, cx->tags.data, cx->tags.len) ||
              sqlite3_bind_int64(st, 12, score_of(sv, score->len)) != SQLITE_OK ||
              bind_text(s, 13, accepted ? value(row, accepted) : "", accepted ? accepted->len : 0) ||
              bind_text(s, 14, cx->author.data, cx->author.len) ||
              bind_text(s, 15, license ? value(row, license) : "", license ? license->len : 0) ||
              bind_text(s, 16, created ? value(row, created) : "", created ? created->len : 0) ||
              sqlite3_bind_null(st, 17) != SQLITE_OK || sqlite3_bind_int64(st, 18, 0) != SQLITE_OK ||
              bind_text(s, 19, cx->label, cx->label_len) || sqlite3_bind_int64(st, 20, line) != SQLITE_OK;
    Py_XDECREF(body);
    PyMem_Free(owned);
    if (bad) {
        sqlite_error(s->db, "scan_posts: bind");
        return -1;
    }
    if (step(s) < 0)
        return -1;
    *counted = 1;
    return 0;
fail:
    Py_XDECREF(body);
    PyMem_Free(owned);
    return -1;
}

static PyObject *attrib_of(const Row *row) {
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
    for (int i = 0; i < row->n; i++) {
        PyObject *k = PyUnicode_FromStringAndSize(row->attrs[i].name, row->attrs[i].name_len);
        PyObject *v = str_of(row, &row->attrs[i]);
        int rc = (k && v) ? PyDict_SetItem(d, k, v) : -1;
        Py_XDECREF(k);
        Py_XDECREF(v);
        if (rc < 0) {
            Py_DECREF(d);
            return NULL;
        }
    }
    return d;
}

/* Past the white space between rows (" ", "\t", "\n", "\r\n"), counting its line ends into *line; stops at
 * anything else, a lone "\r" included (XML reads it as a line end, which the ranges' line counts do not). */
static const char *skip_gap(const char *p, const char *end, long long *line) {
    while (p < end) {
        if (*p == ' ' || *p == '\t') {
            p++;
        } else if (*p == '\n') {
            (*line)++;
            p++;
        } else if (*p == '\r' && end - p >= 2 && p[1] == '\n') {
            (*line)++;
            p += 2;
        } else {
            break;
        }
    }
    return p;
}

static PyObject *scan_posts(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *capsule, *site, *label, *odd, *direct = Py_None;
    Py_buffer data;
    long long line;
    Ctx cx = {0};
    Py_ssize_t max_row_bytes;
    if (!PyArg_ParseTuple(args, "Oy*LUUnnOO|O:scan_posts", &capsule, &data, &line, &site, &label, &cx.max_chars,
                          &max_row_bytes, &cx.render, &odd, &direct))
        return NULL;
    if (direct != Py_None && (cx.direct = (RenderUtf8)PyCapsule_GetPointer(direct, RENDER_UTF8_CAPSULE)) == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    PyObject *skipped = PyDict_New(), *result = NULL;
    Row *row = PyMem_Calloc(1, sizeof(Row));
    Py_ssize_t rows = 0;
    int plain = 1;
    cx.shard = PyCapsule_GetPointer(capsule, SHARD);
    cx.site = PyUnicode_AsUTF8AndSize(site, &cx.site_len);
    cx.label = PyUnicode_AsUTF8AndSize(label, &cx.label_len);
    if (!skipped || !row || !cx.shard || !cx.site || !cx.label) {
        if (!row)
            PyErr_NoMemory();
        goto done;
    }
    const char *p = data.buf, *end = p + data.len;
    for (;;) {
        p = skip_gap(p, end, &line);
        if (p >= end || *p != '<') { /* the end, or a lone "\r" or other text between rows */
            plain = p >= end;
            break;
        }
        const char *after, *next;
        int rc = parse_row(p, end, row, &after);
        if (rc < 0) {
            PyErr_NoMemory();
            goto done;
        }
        long long row_line = line;
        if (rc == 1) {
            next = skip_gap(after, end, &line);
            /* the parser's path measures an element from its '<' to the next '<' (xmlstream.RowParser) */
            rc = next - p <= max_row_bytes;
        }
        if (rc == 0) {
            plain = 0;
            break;
        }
        int counted;
        if (post_of(&cx, row, row_line, skipped, &counted) < 0)
            goto done;
        if (counted) {
            rows++;
        } else { /* the reader decides: its store row, if any, takes the row's place */
            PyObject *attrib = attrib_of(row);
            PyObject *stored = attrib ? PyObject_CallFunction(odd, "OL", attrib, row_line) : NULL;
            Py_XDECREF(attrib);
            if (stored == NULL)
                goto done;
            rc = stored == Py_None ? 0 : insert_tuple(cx.shard, stored);
            Py_DECREF(stored);
            if (rc < 0)
                goto done;
        }
        p = next;
    }
    result = plain ? Py_BuildValue("(Ond)", skipped, rows, cx.render_seconds) : Py_NewRef(Py_None);
done:
    PyBuffer_Release(&data);
    Py_XDECREF(skipped);
    if (row)
        PyMem_Free(row->values.data);
    PyMem_Free(row);
    PyMem_Free(cx.title.data);
    PyMem_Free(cx.tags.data);
    PyMem_Free(cx.author.data);
    return result;
}

static PyMethodDef methods[] = {
    {"open_shard", open_shard, METH_VARARGS,
     "open_shard(posts_columns, votes_columns) -> shard: an in-memory SQLite database with the two tables."},
    {"scan_posts", scan_posts, METH_VARARGS,
     "scan_posts(shard, data, line, site, label, max_chars, max_row_bytes, render, odd) -> (skipped, rows, "
     "render_seconds) | None: plain Posts.xml rows into the shard's posts (see the top of _fastposts.c)."},
    {"finish_shard", finish_shard, METH_O, "finish_shard(shard) -> bytes: the shard's SQLite image."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fastposts",
    .m_doc = "Posts.xml rows read from their bytes, without libxml2 (see the top of _fastposts.c).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fastposts(void) { return PyModule_Create(&module); }
