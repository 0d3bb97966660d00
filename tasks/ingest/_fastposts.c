/*
 * alignflow.tasks.ingest._fastposts: Posts.xml rows read from their bytes, without libxml2.
 *
 * scan_posts(data, line, site, label, max_chars, max_row_bytes, render)
 *     -> (posts, odd, skipped, rows, render_seconds) | None
 *
 * ``data`` holds whole lines of a Posts.xml range (after its prolog, before its closing tag); ``line`` is
 * the number of its first line. Every line must be a row in the plain form the dumps write:
 *
 *   line   := [ \t]* "<row" (" "+ name "=\"" value "\"")+ " "* "/>" "\r"?
 *   name   := [A-Za-z][A-Za-z0-9]*, not starting with "xml" (any case), each name once per row
 *   value  := UTF-8 text without '<', '"' or a control character (U+0000..U+001F), whose characters are
 *             XML characters (no U+FFFE, U+FFFF), with the references &lt; &gt; &amp; &quot; &apos; &#N; &#xH;
 *             to XML characters
 *
 * Such a line is well formed and means the same to any XML parser: its attributes are exactly the
 * values above with their references replaced. If one line is not plain (or is longer than
 * max_row_bytes), None comes back and the whole range goes to libxml2 (ranges.read_range), which
 * decides what the line means or which error it is.
 *
 * A plain row becomes what stackexchange.PostRowReader makes of it, as a row of the staging store
 * (store.post_row), when it takes none of the reader's checks' other branches:
 *   Id and (answers) ParentId: 1 to 18 ASCII digits; PostTypeId 1 or 2; Score: -?[0-9]{1,18};
 *   a question's title not empty once its whitespace runs are collapsed, without a non-ASCII space;
 *   an answer's body not empty once rendered; a body of at most max_chars characters once rendered.
 * A row with another PostTypeId of ASCII digits is counted in ``skipped`` (by its PostTypeId) and
 * ``rows``. Any other row is "odd": its attributes (a dict, in document order) and its line go to
 * ``odd`` for the reader itself, and None holds its place in ``posts``. Bodies are rendered by calling
 * ``render`` (clean.html_to_text); ``render_seconds`` is the time spent in it.
 * tests/test_fast_posts.py reads generated, mutated and real rows both ways and requires the same result.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

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

/* Parse line [p, end) (without its '\n') into row; 1 if plain, 0 if not, -1 on memory error. */
static int parse_line(const char *p, const char *end, Row *row) {
    row->n = 0;
    row->values.len = 0;
    if (end > p && end[-1] == '\r')
        end--;
    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    if (end - p < 4 || memcmp(p, "<row", 4) != 0)
        return 0;
    p += 4;
    for (;;) {
        const char *gap = p;
        while (p < end && *p == ' ')
            p++;
        if (end - p == 2 && p[0] == '/' && p[1] == '>')
            return row->n > 0;
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
        if (row->n == MAX_ATTRS || end - p < 2 || p[0] != '=' || p[1] != '"')
            return 0;
        p += 2;
        Attr *a = &row->attrs[row->n++];
        a->name = name;
        a->name_len = name_len;
        a->off = row->values.len;
        for (;;) {
            const char *run = p;
            while (p < end && (unsigned char)*p >= 0x20 && (unsigned char)*p < 0x80 && *p != '"' && *p != '&' &&
                   *p != '<')
                p++;
            if (p > run && buf_put(&row->values, run, p - run) < 0)
                return -1;
            if (p >= end)
                return 0;
            if (*p == '"') {
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

/* "0...0" + id, 20 characters (scoring.numeric_key of an id of at most 18 digits). */
static PyObject *key_of(const char *s, Py_ssize_t n) {
    char text[20];
    memset(text, '0', 20);
    memcpy(text + 20 - n, s, (size_t)n);
    return PyUnicode_FromStringAndSize(text, 20);
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
    Py_ssize_t i = 0;
    while (i < n) {
        while (i < n && ascii_space(s[i]))
            i++;
        Py_ssize_t start = i;
        while (i < n && !ascii_space(s[i]))
            i++;
        if (i > start) {
            if (out->len && buf_put(out, " ", 1) < 0)
                return -1;
            if (buf_put(out, text + start, i - start) < 0)
                return -1;
        }
    }
    return 0;
}

/* tags split on runs of '<', '>' and '|', the non-empty parts joined by '|'. */
static int join_tags(const char *s, Py_ssize_t n, Buf *out) {
    out->len = 0;
    Py_ssize_t i = 0;
    while (i < n) {
        while (i < n && (s[i] == '<' || s[i] == '>' || s[i] == '|'))
            i++;
        Py_ssize_t start = i;
        while (i < n && s[i] != '<' && s[i] != '>' && s[i] != '|')
            i++;
        if (i > start) {
            if (out->len && buf_put(out, "|", 1) < 0)
                return -1;
            if (buf_put(out, s + start, i - start) < 0)
                return -1;
        }
    }
    return 0;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

typedef struct {
    PyObject *site, *label, *render, *source, *question, *answer, *empty, *zero, *one, *none;
    Py_ssize_t max_chars;
    Buf title, tags, author;
    double render_seconds;
} Ctx;

/* The row's store tuple in *out, or NULL with *out untouched for an odd row; -1 on error. */
static int post_of(Ctx *cx, const Row *row, long long line, PyObject **out, PyObject *skipped, int *counted) {
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
    /* the body, rendered */
    const Attr *body_attr = get(row, "Body");
    PyObject *raw_body = str_of(row, body_attr);
    if (raw_body == NULL)
        return -1;
    double t0 = now();
    PyObject *body = PyObject_CallOneArg(cx->render, raw_body);
    cx->render_seconds += now() - t0;
    Py_DECREF(raw_body);
    if (body == NULL)
        return -1;
    if (!PyUnicode_Check(body)) {
        Py_DECREF(body);
        PyErr_SetString(PyExc_TypeError, "scan_posts: render() must return a str");
        return -1;
    }
    Py_ssize_t chars = PyUnicode_GET_LENGTH(body);
    if ((is_answer && chars == 0) || chars > cx->max_chars) {
        Py_DECREF(body);
        return 0;
    }
    /* author: user:<OwnerUserId>, else name:<OwnerDisplayName>, else empty */
    const Attr *owner = get(row, "OwnerUserId"), *display = get(row, "OwnerDisplayName");
    cx->author.len = 0;
    if (owner && owner->len) {
        if (buf_put(&cx->author, "user:", 5) < 0 || buf_put(&cx->author, value(row, owner), owner->len) < 0)
            goto fail_body;
    } else if (display && display->len) {
        if (buf_put(&cx->author, "name:", 5) < 0 || buf_put(&cx->author, value(row, display), display->len) < 0)
            goto fail_body;
    }
    const Attr *tags = get(row, "Tags");
    if (join_tags(tags ? value(row, tags) : "", tags ? tags->len : 0, &cx->tags) < 0)
        goto fail_body;
    const char *qid = is_question ? value(row, id) : value(row, parent);
    Py_ssize_t qid_len = is_question ? id->len : parent->len;
    PyObject *accepted = is_question ? str_of(row, get(row, "AcceptedAnswerId")) : Py_NewRef(cx->empty);
    PyObject *tuple = Py_BuildValue(
        "(OONNOONNNNNLNNNNOOOL)",
        cx->site, cx->source, PyUnicode_FromStringAndSize(value(row, id), id->len),
        key_of(value(row, id), id->len), is_question ? cx->question : cx->answer, is_question ? cx->zero : cx->one,
        PyUnicode_FromStringAndSize(qid, qid_len), key_of(qid, qid_len),
        is_question ? PyUnicode_DecodeUTF8(cx->title.data, cx->title.len, "strict") : Py_NewRef(cx->empty),
        body,
        PyUnicode_DecodeUTF8(cx->tags.data ? cx->tags.data : "", cx->tags.len, "strict"),
        score_of(sv, score->len),
        accepted,
        PyUnicode_DecodeUTF8(cx->author.data ? cx->author.data : "", cx->author.len, "strict"),
        str_of(row, get(row, "ContentLicense")), str_of(row, get(row, "CreationDate")),
        cx->none, cx->zero, cx->label, line);
    if (tuple == NULL)
        return -1;
    *out = tuple;
    *counted = 1;
    return 0;
fail_body:
    Py_DECREF(body);
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

static PyObject *scan_posts(PyObject *module, PyObject *args) {
    (void)module;
    Py_buffer data;
    long long line;
    Ctx cx = {0};
    Py_ssize_t max_row_bytes;
    if (!PyArg_ParseTuple(args, "y*LUUnnO:scan_posts", &data, &line, &cx.site, &cx.label, &cx.max_chars,
                          &max_row_bytes, &cx.render))
        return NULL;
    PyObject *posts = PyList_New(0), *odd = PyList_New(0), *skipped = PyDict_New(), *result = NULL;
    cx.source = PyUnicode_FromString("stackexchange");
    cx.question = PyUnicode_FromString("question");
    cx.answer = PyUnicode_FromString("answer");
    cx.empty = PyUnicode_FromString("");
    cx.zero = PyLong_FromLong(0);
    cx.one = PyLong_FromLong(1);
    cx.none = Py_None;
    Row *row = PyMem_Calloc(1, sizeof(Row));
    Py_ssize_t rows = 0;
    int plain = 1;
    if (!posts || !odd || !skipped || !cx.source || !cx.question || !cx.answer || !cx.empty || !cx.zero || !cx.one ||
        !row)
        goto done;
    const char *p = data.buf, *end = p + data.len;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *stop = nl ? nl : end;
        int rc = stop - p > max_row_bytes ? 0 : parse_line(p, stop, row);
        if (rc < 0) {
            PyErr_NoMemory();
            goto done;
        }
        if (rc == 0) {
            plain = 0;
            break;
        }
        PyObject *post = NULL;
        int counted;
        if (post_of(&cx, row, line, &post, skipped, &counted) < 0)
            goto done;
        if (post != NULL) {
            rc = PyList_Append(posts, post);
            Py_DECREF(post);
            if (rc < 0)
                goto done;
        } else if (!counted) {
            PyObject *attrib = attrib_of(row);
            PyObject *item = attrib ? Py_BuildValue("(NL)", attrib, line) : NULL;
            rc = item ? PyList_Append(odd, item) : -1;
            Py_XDECREF(item);
            if (rc < 0 || PyList_Append(posts, Py_None) < 0)
                goto done;
        }
        rows += counted;
        line++;
        p = nl ? nl + 1 : end;
    }
    result = plain ? Py_BuildValue("(OOOnd)", posts, odd, skipped, rows, cx.render_seconds) : Py_NewRef(Py_None);
done:
    PyBuffer_Release(&data);
    Py_XDECREF(posts);
    Py_XDECREF(odd);
    Py_XDECREF(skipped);
    Py_XDECREF(cx.source);
    Py_XDECREF(cx.question);
    Py_XDECREF(cx.answer);
    Py_XDECREF(cx.empty);
    Py_XDECREF(cx.zero);
    Py_XDECREF(cx.one);
    if (row)
        PyMem_Free(row->values.data);
    PyMem_Free(row);
    PyMem_Free(cx.title.data);
    PyMem_Free(cx.tags.data);
    PyMem_Free(cx.author.data);
    return result;
}

static PyMethodDef methods[] = {
    {"scan_posts", scan_posts, METH_VARARGS,
     "scan_posts(data, line, site, label, max_chars, max_row_bytes, render) -> (posts, odd, skipped, rows, "
     "render_seconds) | None: plain Posts.xml rows as store rows (see the top of _fastposts.c)."},
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
