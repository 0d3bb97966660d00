/*
 * alignflow.tasks.ingest._fastreddit: ordinary Pushshift rows checked in C, and written into a worker's SQLite images.
 *
 * comment_fields(obj) -> (post_id, parent, question_id, site, score, created_ts, author, distinguished,
 *                         body, body_final, is_reply) | None
 *
 * ``obj`` is what orjson made of one line. The reader (reddit.read_line and reddit._comment) checks a
 * comment field by field, in Python, at ~20 us a line; most lines take none of its error branches. This
 * function answers for those lines only, with the values the reader would compute:
 *
 *   id, parent_id, subreddit (and link_id when a string): ASCII strings, not blank once stripped;
 *     parent_id "t1_x" or "t3_x"; question_id: link_id's id when it is "t3_x", else "" for a reply and
 *     the parent's id for a top-level comment
 *   score (or ups when score is absent or null): an int within 64 bits (not a bool), or a string of at most
 *     18 digits after an optional '-' (int(s))
 *   created_utc: an int within 64 bits or a finite float (not a bool), or a string -?D+[.D+] -> float
 *   author: "name:" + author when a non-empty string, else ""
 *   distinguished: its truth value
 *   no float of at least 2**63 in magnitude anywhere in the object (orjson reads a wider integer as one;
 *     reddit.parse_json_line then parses the line again with json.loads)
 *   body: a string. body_final == 1: an ASCII body that clean.clean_plain_text leaves as it is but for the
 *     strip and the most common HTML references (body_form, reference), not empty and not "[deleted]" /
 *     "[removed]": ``body`` is the text the reader stores. body_final == 0: ``body`` is the raw string, for
 *     the caller to check and clean in Python.
 *
 * Any other value (a missing field, a string id, a float score, non-ASCII ids, ...) gives None: the
 * caller then runs the reader itself, which decides what the line is or which error it raises. So the
 * result never differs from the reader's; tests/test_reddit_fast.py compares both on generated and
 * mutated lines.
 *
 * submission_fields(obj) -> (post_id, site, score, created_ts, author, title, body, body_final) | None
 *   the same for a submission (reddit._submission): the title takes the body's rules above and must not be
 *   "[deleted]" / "[removed]" / "[deleted by user]"; a missing selftext or one of the markers gives "".
 *
 * Image([(table, column definitions), ...]): an in-memory SQLite database, rows added in order
 *   (.add(table, row), .rows(table), .serialize()): a reading worker's image (store.sqlite_image's form).
 * store_comment(obj, posts, replies, line, license, file, with_replies), store_submission(...): the rows the
 *   reader would hand the stores for an ordinary line, written straight into the images (posts: the staging
 *   store's posts and votes; replies: the reply store's comments and submissions), without a Python tuple
 *   per row: 1 when stored, 2 for a reply left out (no reply pairs), else what comment_fields /
 *   submission_fields gave (None, or fields whose text needs clean_plain_text: nothing stored).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

#include <sqlite3.h>

#define MAX_DEPTH 256
/* ASCII classes (ctype's depend on the locale) */
#define DIGIT(c) ((c) >= '0' && (c) <= '9')
#define ALPHA(c) (((c) | 0x20) >= 'a' && ((c) | 0x20) <= 'z')
#define XDIGIT(c) (DIGIT(c) || (((c) | 0x20) >= 'a' && ((c) | 0x20) <= 'f'))

static PyObject *reddit_prefix, *name_prefix, *empty;
static PyObject *k_id, *k_parent_id, *k_link_id, *k_subreddit, *k_score, *k_ups, *k_created_utc, *k_author,
    *k_distinguished, *k_body, *k_title, *k_selftext;

/* str.strip()'s whitespace among ASCII characters */
static int ascii_space(unsigned char c) { return c == ' ' || (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x1f); }

/* 1: a float of magnitude >= 2**63 (or NaN) is in value; 0: none; -1: nested too deep to tell */
static int has_wide_float(PyObject *value, int depth) {
    if (depth > MAX_DEPTH)
        return -1;
    if (PyFloat_CheckExact(value)) {
        double v = PyFloat_AS_DOUBLE(value);
        return !(-9223372036854775808.0 < v && v < 9223372036854775808.0);
    }
    if (PyDict_CheckExact(value)) {
        Py_ssize_t pos = 0;
        PyObject *key, *item;
        while (PyDict_Next(value, &pos, &key, &item)) {
            int r = has_wide_float(item, depth + 1);
            if (r)
                return r;
        }
        return 0;
    }
    if (PyList_CheckExact(value)) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(value); i++) {
            int r = has_wide_float(PyList_GET_ITEM(value, i), depth + 1);
            if (r)
                return r;
        }
    }
    return 0;
}

/* An ASCII string's stripped bounds in [*start, *end); 0 when value is not an ASCII str. */
static int ascii_bounds(PyObject *value, Py_ssize_t *start, Py_ssize_t *end) {
    if (value == NULL || !PyUnicode_CheckExact(value) || !PyUnicode_IS_ASCII(value))
        return 0;
    const unsigned char *s = PyUnicode_1BYTE_DATA(value);
    Py_ssize_t a = 0, b = PyUnicode_GET_LENGTH(value);
    while (a < b && ascii_space(s[a]))
        a++;
    while (b > a && ascii_space(s[b - 1]))
        b--;
    *start = a;
    *end = b;
    return 1;
}

/* The value of key: a borrowed reference, NULL when absent or None (an error is never set: keys are str). */
static PyObject *get(PyObject *obj, PyObject *key) {
    PyObject *value = PyDict_GetItemWithError(obj, key);
    return value == Py_None ? NULL : value;
}

/* The character an HTML reference at s[i] == '&' stands for, with *end just past it; 0 when no reference
 * starts there (clean._ENTITY does not match: the '&' stays as it is); -1 when one does but is not among
 * those decoded here: &amp; &lt; &gt; &quot; &apos; and &#N; / &#xH; for '!'..'~' (html.unescape gives
 * these characters for them; a space or a control character would change what the other rules see). */
static int reference(const unsigned char *s, Py_ssize_t i, Py_ssize_t b, Py_ssize_t *end) {
    Py_ssize_t j = i + 1;
    if (j < b && s[j] == '#') {
        int hex = j + 1 < b && (s[j + 1] == 'x' || s[j + 1] == 'X');
        Py_ssize_t k = j + 1 + hex, start = k;
        long value = 0;
        while (k < b && (hex ? XDIGIT(s[k]) : DIGIT(s[k]))) {
            if (k - start < 8)
                value = value * (hex ? 16 : 10) + (DIGIT(s[k]) ? s[k] - '0' : ((s[k] | 0x20) - 'a' + 10));
            k++;
        }
        if (k == start || k - start > (hex ? 6 : 7) || k >= b || s[k] != ';')
            return 0;
        *end = k + 1;
        return value >= '!' && value <= '~' ? (int)value : -1;
    }
    if (j >= b || !ALPHA(s[j]))
        return 0;
    Py_ssize_t k = j + 1;
    while (k < b && (ALPHA(s[k]) || DIGIT(s[k])))
        k++;
    if (k - j < 2 || k - j > 32 || k >= b || s[k] != ';')
        return 0;
    *end = k + 1;
    static const struct {
        const char *name;
        int c;
    } names[] = {{"amp", '&'}, {"lt", '<'}, {"gt", '>'}, {"quot", '"'}, {"apos", '\''}};
    for (size_t n = 0; n < sizeof names / sizeof names[0]; n++)
        if ((size_t)(k - j) == strlen(names[n].name) && memcmp(s + j, names[n].name, (size_t)(k - j)) == 0)
            return names[n].c;
    return -1;
}

/* What clean_plain_text does to the ASCII text s[a:b] (s[a], s[b-1] not whitespace) besides the strip:
 * 1 nothing, 2 decoding references that reference() decodes, 0 more (the caller cleans it in Python):
 * a control character but \t and \n, another reference, " \n", "\t\n" or "\n\n\n". */
static unsigned char special[256]; /* bytes body_form looks at: controls, '&', DEL (set in the module's init) */

static int body_form(const unsigned char *s, Py_ssize_t a, Py_ssize_t b) {
    int form = 1;
    for (Py_ssize_t i = a; i < b; i++) {
        while (i < b && !special[s[i]])
            i++;
        if (i == b)
            break;
        unsigned char c = s[i];
        if (c == '\t')
            continue;
        if (c == '\n') {
            if (s[i - 1] == ' ' || s[i - 1] == '\t') /* i > a: s[a] is not whitespace */
                return 0;
            if (i + 2 < b && s[i + 1] == '\n' && s[i + 2] == '\n')
                return 0;
        } else if (c == '&') {
            Py_ssize_t end;
            int r = reference(s, i, b, &end);
            if (r < 0)
                return 0;
            if (r > 0)
                form = 2;
        } else {
            return 0; /* another control character, or DEL */
        }
    }
    return form;
}

/* s[a:b] with the references reference() knows decoded (body_form gave 2) */
static PyObject *decode_references(const unsigned char *s, Py_ssize_t a, Py_ssize_t b) {
    char *out = PyMem_Malloc((size_t)(b - a));
    if (out == NULL)
        return PyErr_NoMemory();
    Py_ssize_t n = 0;
    for (Py_ssize_t i = a; i < b; i++) {
        Py_ssize_t end;
        int r = s[i] == '&' ? reference(s, i, b, &end) : 0;
        if (r > 0) {
            out[n++] = (char)r;
            i = end - 1;
        } else {
            out[n++] = (char)s[i];
        }
    }
    PyObject *text = PyUnicode_DecodeASCII(out, n, NULL);
    PyMem_Free(out);
    return text;
}

/* A numeric string in the plain form (ASCII, stripped: -?D+ or, with fraction, -?D+.D+; at most 40 characters):
 * 1 with its bounds; 0 otherwise (another form is left to the reader's int() / float()). */
static int plain_number(PyObject *value, int fraction, Py_ssize_t *a, Py_ssize_t *b) {
    if (!ascii_bounds(value, a, b) || *b - *a > 40 || *a == *b)
        return 0;
    const unsigned char *s = PyUnicode_1BYTE_DATA(value);
    Py_ssize_t i = *a + (s[*a] == '-'), digits = 0, dots = 0;
    for (; i < *b; i++) {
        if (DIGIT(s[i]))
            digits++;
        else if (s[i] == '.' && fraction && !dots && digits && i + 1 < *b)
            dots++;
        else
            return 0;
    }
    return digits > 0;
}

/* What every Pushshift row needs: id, subreddit, score (or ups), created_utc, author, no wide float. */
typedef struct {
    PyObject *id, *sub;
    Py_ssize_t ia, ib, sa, sb;
    long long score;
    double created;
} Common;

/* 1: obj is a dict whose common fields take their ordinary form (filled in c); 0: otherwise */
static int common_fields(PyObject *obj, Common *c) {
    if (!PyDict_CheckExact(obj))
        return 0;
    c->id = get(obj, k_id);
    c->sub = get(obj, k_subreddit);
    if (!ascii_bounds(c->id, &c->ia, &c->ib) || c->ia == c->ib || !ascii_bounds(c->sub, &c->sa, &c->sb) ||
        c->sa == c->sb)
        return 0;
    PyObject *score = get(obj, k_score);
    if (score == NULL)
        score = get(obj, k_ups);
    if (score == NULL)
        return 0;
    int overflow = 0;
    Py_ssize_t a, b;
    if (PyLong_CheckExact(score)) {
        c->score = PyLong_AsLongLongAndOverflow(score, &overflow);
        if (overflow || (c->score == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return 0;
        }
    } else if (plain_number(score, 0, &a, &b) && b - a <= 19) { /* "12": int(s), within 64 bits at 18 digits */
        const unsigned char *s = PyUnicode_1BYTE_DATA(score);
        int negative = s[a] == '-';
        long long value = 0;
        for (Py_ssize_t i = a + negative; i < b; i++) {
            if (i - a - negative >= 18)
                return 0;
            value = value * 10 + (s[i] - '0');
        }
        c->score = negative ? -value : value;
    } else {
        return 0;
    }
    PyObject *created = get(obj, k_created_utc);
    if (created == NULL)
        return 0;
    if (PyFloat_CheckExact(created)) {
        c->created = PyFloat_AS_DOUBLE(created);
        if (!isfinite(c->created))
            return 0;
    } else if (PyLong_CheckExact(created)) {
        long long value = PyLong_AsLongLongAndOverflow(created, &overflow);
        if (overflow || (value == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return 0;
        }
        c->created = PyLong_AsDouble(created); /* float(int), rounded as Python rounds it */
    } else if (plain_number(created, 1, &a, &b)) { /* "1420070400": float(s), by Python's own conversion */
        char digits[48];
        memcpy(digits, PyUnicode_1BYTE_DATA(created) + a, (size_t)(b - a));
        digits[b - a] = 0;
        c->created = PyOS_string_to_double(digits, NULL, NULL);
        if (c->created == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        if (!isfinite(c->created))
            return 0;
    } else {
        return 0;
    }
    return has_wide_float(obj, 0) == 0;
}

/* A text field (a str): its stripped bounds and body_form's answer (0 when not ASCII) */
typedef struct {
    PyObject *value;
    Py_ssize_t a, b;
    int form;
} Text;

static void text_of(PyObject *value, Text *t) {
    t->value = value;
    t->a = t->b = 0;
    t->form = 0;
    if (ascii_bounds(value, &t->a, &t->b))
        t->form = t->a == t->b ? 1 : body_form(PyUnicode_1BYTE_DATA(value), t->a, t->b);
}

/* whether the stripped text is one of the words (NULL-terminated) */
static int stripped_is(const Text *t, const char *const *words) {
    for (; *words; words++)
        if ((size_t)(t->b - t->a) == strlen(*words) && memcmp(PyUnicode_1BYTE_DATA(t->value) + t->a, *words,
                                                              (size_t)(t->b - t->a)) == 0)
            return 1;
    return 0;
}

/* the text the reader stores (form 1 or 2), or the raw string (form 0): a new reference */
static PyObject *text_value(const Text *t) {
    if (t->form == 1)
        return PyUnicode_Substring(t->value, t->a, t->b);
    if (t->form == 2)
        return decode_references(PyUnicode_1BYTE_DATA(t->value), t->a, t->b);
    Py_INCREF(t->value);
    return t->value;
}

static PyObject *author_of(PyObject *obj) {
    PyObject *author = get(obj, k_author);
    if (author != NULL && PyUnicode_Check(author) && PyUnicode_GET_LENGTH(author) > 0)
        return PyUnicode_Concat(name_prefix, author);
    Py_INCREF(empty);
    return empty;
}

/* a tuple of n new references (stolen; NULL if any is NULL, the others released) */
static PyObject *pack(int n, PyObject **items) {
    PyObject *tuple = NULL;
    for (int i = 0; i < n; i++)
        if (items[i] == NULL)
            goto fail;
    if ((tuple = PyTuple_New(n)) == NULL)
        goto fail;
    for (int i = 0; i < n; i++)
        PyTuple_SET_ITEM(tuple, i, items[i]);
    return tuple;
fail:
    for (int i = 0; i < n; i++)
        Py_XDECREF(items[i]);
    return NULL;
}

static const char *const deleted_markers[] = {"[deleted]", "[removed]", NULL};
static const char *const deleted_titles[] = {"[deleted]", "[removed]", "[deleted by user]", NULL};

static PyObject *comment_fields(PyObject *self, PyObject *obj) {
    (void)self;
    Common c;
    Py_ssize_t pa, pb, la, lb;
    if (!common_fields(obj, &c))
        Py_RETURN_NONE;
    PyObject *parent = get(obj, k_parent_id);
    if (!ascii_bounds(parent, &pa, &pb) || pb - pa <= 3)
        Py_RETURN_NONE;
    const char *p = (const char *)PyUnicode_1BYTE_DATA(parent) + pa;
    int is_reply = memcmp(p, "t1_", 3) == 0;
    if (!is_reply && memcmp(p, "t3_", 3) != 0)
        Py_RETURN_NONE;
    PyObject *body = get(obj, k_body);
    if (body == NULL || !PyUnicode_CheckExact(body))
        Py_RETURN_NONE;
    Text t;
    text_of(body, &t);
    if (PyUnicode_IS_ASCII(body) && (t.a == t.b || stripped_is(&t, deleted_markers)))
        Py_RETURN_NONE; /* quarantined by the reader */
    PyObject *link = get(obj, k_link_id);
    int has_link = 0;
    if (link != NULL && PyUnicode_CheckExact(link)) {
        if (!ascii_bounds(link, &la, &lb)) /* a non-ASCII link_id: the reader decides */
            Py_RETURN_NONE;
        has_link = lb - la > 3 && memcmp(PyUnicode_1BYTE_DATA(link) + la, "t3_", 3) == 0;
    }
    int distinguished = 0;
    PyObject *dist = get(obj, k_distinguished);
    if (dist != NULL && (distinguished = PyObject_IsTrue(dist)) < 0)
        return NULL;

    PyObject *question_id;
    if (has_link)
        question_id = PyUnicode_Substring(link, la + 3, lb);
    else if (is_reply) {
        question_id = empty;
        Py_INCREF(question_id);
    } else
        question_id = PyUnicode_Substring(parent, pa + 3, pb);
    PyObject *subreddit = PyUnicode_Substring(c.sub, c.sa, c.sb);
    PyObject *items[11] = {
        PyUnicode_Substring(c.id, c.ia, c.ib),
        PyUnicode_Substring(parent, pa, pb),
        question_id,
        subreddit == NULL ? NULL : PyUnicode_Concat(reddit_prefix, subreddit),
        PyLong_FromLongLong(c.score),
        PyFloat_FromDouble(c.created),
        author_of(obj),
        PyLong_FromLong(distinguished),
        text_value(&t),
        PyLong_FromLong(t.form != 0),
        PyLong_FromLong(is_reply),
    };
    Py_XDECREF(subreddit);
    return pack(11, items);
}

static PyObject *submission_fields(PyObject *self, PyObject *obj) {
    (void)self;
    Common c;
    if (!common_fields(obj, &c))
        Py_RETURN_NONE;
    PyObject *title = get(obj, k_title), *selftext = get(obj, k_selftext);
    if (title == NULL || !PyUnicode_CheckExact(title) || (selftext != NULL && !PyUnicode_CheckExact(selftext)))
        Py_RETURN_NONE;
    Text tt, bt;
    text_of(title, &tt);
    if (tt.form == 0 || tt.a == tt.b || stripped_is(&tt, deleted_titles))
        Py_RETURN_NONE; /* quarantined by the reader, or a title for clean_plain_text */
    PyObject *body;
    int body_final = 1;
    if (selftext == NULL) {
        body = empty; /* a link post */
        Py_INCREF(body);
    } else {
        text_of(selftext, &bt);
        if (bt.form != 0 && stripped_is(&bt, deleted_markers)) {
            body = empty;
            Py_INCREF(body);
        } else {
            body = text_value(&bt);
            body_final = bt.form != 0;
        }
    }
    PyObject *subreddit = PyUnicode_Substring(c.sub, c.sa, c.sb);
    PyObject *items[8] = {
        PyUnicode_Substring(c.id, c.ia, c.ib),
        subreddit == NULL ? NULL : PyUnicode_Concat(reddit_prefix, subreddit),
        PyLong_FromLongLong(c.score),
        PyFloat_FromDouble(c.created),
        author_of(obj),
        text_value(&tt),
        body,
        PyLong_FromLong(body_final),
    };
    Py_XDECREF(subreddit);
    return pack(8, items);
}

/* -- rows straight into a worker's SQLite images -------------------------------------------------------- */

#define MAX_TABLES 4

/* An in-memory SQLite database whose tables are filled in order: a reading worker's image (store.sqlite_image's
 * format: page size 64 KiB, the tables and column definitions given, rows in insertion order). */
typedef struct {
    PyObject_HEAD sqlite3 *db;
    int tables;
    sqlite3_stmt *insert[MAX_TABLES];
    int columns[MAX_TABLES];
    Py_ssize_t rows[MAX_TABLES];
} Image;

static PyObject *image_error(Image *im, const char *what) {
    PyErr_Format(PyExc_RuntimeError, "SQLite image: %s: %s", what, im->db ? sqlite3_errmsg(im->db) : "out of memory");
    return NULL;
}

static void image_dealloc(Image *im) {
    for (int t = 0; t < im->tables; t++)
        sqlite3_finalize(im->insert[t]);
    sqlite3_close(im->db);
    Py_TYPE(im)->tp_free((PyObject *)im);
}

/* Image([(name, column definitions), ...]) */
static int image_init(Image *im, PyObject *args, PyObject *kwargs) {
    PyObject *tables;
    if (kwargs != NULL || !PyArg_ParseTuple(args, "O!:Image", &PyList_Type, &tables))
        return -1;
    if (im->db != NULL || PyList_GET_SIZE(tables) < 1 || PyList_GET_SIZE(tables) > MAX_TABLES) {
        PyErr_SetString(PyExc_ValueError, "Image: one to four tables, once");
        return -1;
    }
    if (sqlite3_open(":memory:", &im->db) != SQLITE_OK ||
        sqlite3_exec(im->db, "PRAGMA page_size=65536", NULL, NULL, NULL) != SQLITE_OK) {
        image_error(im, "open");
        return -1;
    }
    for (Py_ssize_t t = 0; t < PyList_GET_SIZE(tables); t++) {
        const char *name, *columns;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(tables, t), "ss:Image", &name, &columns))
            return -1;
        int n = 1;
        for (const char *c = columns; *c; c++)
            n += *c == ',';
        PyObject *create = PyUnicode_FromFormat("CREATE TABLE %s (%s)", name, columns);
        PyObject *insert = PyUnicode_FromFormat("INSERT INTO %s VALUES (?", name);
        for (int i = 1; insert != NULL && i < n; i++)
            PyUnicode_AppendAndDel(&insert, PyUnicode_FromString(",?"));
        if (insert != NULL)
            PyUnicode_AppendAndDel(&insert, PyUnicode_FromString(")"));
        int rc = create == NULL || insert == NULL ? -1
                 : sqlite3_exec(im->db, PyUnicode_AsUTF8(create), NULL, NULL, NULL) != SQLITE_OK ||
                           sqlite3_prepare_v2(im->db, PyUnicode_AsUTF8(insert), -1, &im->insert[t], NULL) != SQLITE_OK
                       ? -2
                       : 0;
        Py_XDECREF(create);
        Py_XDECREF(insert);
        if (rc == -2)
            image_error(im, "create");
        if (rc < 0)
            return -1;
        im->columns[t] = n;
        im->tables = (int)t + 1;
    }
    if (sqlite3_exec(im->db, "BEGIN", NULL, NULL, NULL) != SQLITE_OK) {
        image_error(im, "begin");
        return -1;
    }
    return 0;
}

/* value i (from 1) of the table's insert, bound as Python's sqlite3 binds it (None, int, float, str) */
static int bind(Image *im, int t, int i, PyObject *v) {
    sqlite3_stmt *st = im->insert[t];
    int rc;
    if (v == Py_None)
        rc = sqlite3_bind_null(st, i);
    else if (PyLong_Check(v)) {
        long long x = PyLong_AsLongLong(v);
        if (x == -1 && PyErr_Occurred())
            return -1;
        rc = sqlite3_bind_int64(st, i, x);
    } else if (PyFloat_Check(v))
        rc = sqlite3_bind_double(st, i, PyFloat_AS_DOUBLE(v));
    else if (PyUnicode_Check(v)) {
        Py_ssize_t n;
        const char *text = PyUnicode_AsUTF8AndSize(v, &n);
        if (text == NULL)
            return -1;
        rc = sqlite3_bind_text(st, i, text, (int)n, SQLITE_TRANSIENT);
    } else {
        PyErr_Format(PyExc_TypeError, "SQLite image: a row holds a %s", Py_TYPE(v)->tp_name);
        return -1;
    }
    if (rc != SQLITE_OK) {
        image_error(im, "bind");
        return -1;
    }
    return 0;
}

static int bind_text(Image *im, int t, int i, const char *text) {
    if (sqlite3_bind_text(im->insert[t], i, text, -1, SQLITE_STATIC) != SQLITE_OK) {
        image_error(im, "bind");
        return -1;
    }
    return 0;
}

static int bind_int(Image *im, int t, int i, long long x) {
    if (sqlite3_bind_int64(im->insert[t], i, x) != SQLITE_OK) {
        image_error(im, "bind");
        return -1;
    }
    return 0;
}

static int step(Image *im, int t) {
    int rc = sqlite3_step(im->insert[t]);
    sqlite3_reset(im->insert[t]);
    if (rc != SQLITE_DONE) {
        image_error(im, "insert");
        return -1;
    }
    im->rows[t]++;
    return 0;
}

static int check_table(Image *im, int t) {
    if (im->db == NULL || t < 0 || t >= im->tables) {
        PyErr_SetString(PyExc_ValueError, "SQLite image: no such table");
        return -1;
    }
    return 0;
}

/* one row of the table's width into table t: the values bound in order, then inserted; 0 on success */
static int add_values(Image *im, int t, PyObject *const *values) {
    for (int i = 0; i < im->columns[t]; i++)
        if (bind(im, t, i + 1, values[i]) < 0)
            return -1;
    return step(im, t);
}

/* image.add(table, row): one row (a tuple of the table's width) */
static PyObject *image_add(Image *im, PyObject *args) {
    int t;
    PyObject *row;
    if (!PyArg_ParseTuple(args, "iO!:add", &t, &PyTuple_Type, &row) || check_table(im, t) < 0)
        return NULL;
    if (PyTuple_GET_SIZE(row) != im->columns[t]) {
        PyErr_Format(PyExc_ValueError, "SQLite image: a row of %zd values for %d columns", PyTuple_GET_SIZE(row),
                     im->columns[t]);
        return NULL;
    }
    if (add_values(im, t, PySequence_Fast_ITEMS(row)) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* image.rows(table): rows added to it */
static PyObject *image_rows(Image *im, PyObject *arg) {
    int t = (int)PyLong_AsLong(arg);
    if ((t == -1 && PyErr_Occurred()) || check_table(im, t) < 0)
        return NULL;
    return PyLong_FromSsize_t(im->rows[t]);
}

/* image.serialize(): the database's bytes (the rows added so far are committed first) */
static PyObject *image_serialize(Image *im, PyObject *unused) {
    (void)unused;
    if (im->db == NULL)
        return image_error(im, "serialize");
    if (sqlite3_get_autocommit(im->db) == 0 && sqlite3_exec(im->db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK)
        return image_error(im, "commit");
    sqlite3_int64 size = 0;
    unsigned char *data = sqlite3_serialize(im->db, "main", &size, 0);
    if (data == NULL)
        return image_error(im, "serialize");
    PyObject *bytes = PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)size);
    sqlite3_free(data);
    return bytes;
}

static PyMethodDef image_methods[] = {
    {"add", (PyCFunction)image_add, METH_VARARGS, "add(table, row): one row, in order"},
    {"rows", (PyCFunction)image_rows, METH_O, "rows(table): how many rows were added to it"},
    {"serialize", (PyCFunction)image_serialize, METH_NOARGS, "the database's bytes"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ImageType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "alignflow.tasks.ingest._fastreddit.Image",
    .tp_basicsize = sizeof(Image),
    .tp_dealloc = (destructor)image_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Image([(table, column definitions), ...]): an in-memory SQLite database filled row by row",
    .tp_methods = image_methods,
    .tp_init = (initproc)image_init,
    .tp_new = PyType_GenericNew,
};

/* scoring.numeric_key of an ASCII id: 20 digits zero-filled, or "~" and the id */
static int bind_numeric_key(Image *im, int t, int i, PyObject *id) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(id);
    const char *s = (const char *)PyUnicode_1BYTE_DATA(id);
    char key[40];
    int digits = n > 0 && n <= 20;
    for (Py_ssize_t k = 0; digits && k < n; k++)
        digits = DIGIT(s[k]);
    char *text = key;
    if (digits) {
        memset(key, '0', (size_t)(20 - n));
        memcpy(key + 20 - n, s, (size_t)n);
        n = 20;
    } else {
        if (n + 1 > (Py_ssize_t)sizeof key && (text = PyMem_Malloc((size_t)n + 1)) == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        text[0] = '~';
        memcpy(text + 1, s, (size_t)n);
        n += 1;
    }
    int rc = sqlite3_bind_text(im->insert[t], i, text, (int)n, SQLITE_TRANSIENT);
    if (text != key)
        PyMem_Free(text);
    if (rc != SQLITE_OK) {
        image_error(im, "bind");
        return -1;
    }
    return 0;
}

static int is_image(PyObject *o) { return PyObject_TypeCheck(o, &ImageType) && ((Image *)o)->db != NULL; }

/* store_comment(obj, posts, replies, line, license, file, with_replies): an ordinary comment's rows added to
 * the images as the reader's calls would add them (posts: the staging store's posts, votes; replies: the reply
 * store's comments, submissions): 1 when stored, 2 for a reply left out (no reply pairs: the caller counts
 * it skipped), None when the line is not ordinary (comment_fields), or comment_fields' tuple when its text
 * needs clean_plain_text (nothing stored: the caller cleans it and adds the rows). */
typedef struct {
    PyObject *obj, *posts, *replies, *line, *license, *file; /* line: an int */
    int with_replies;
} StoreArgs;

/* the arguments of store_comment and store_submission; 0 on success */
static int store_args(PyObject *args, const char *format, StoreArgs *a) {
    if (!PyArg_ParseTuple(args, format, &a->obj, &a->posts, &a->replies, &PyLong_Type, &a->line, &a->license,
                          &a->file, &a->with_replies))
        return -1;
    Image *posts = (Image *)a->posts, *replies = (Image *)a->replies;
    if (!is_image(a->posts) || posts->columns[0] != 20 ||
        (a->with_replies && (!is_image(a->replies) || replies->tables < 2 || replies->columns[0] != 13 ||
                             replies->columns[1] != 6))) {
        PyErr_SetString(PyExc_TypeError, "posts and replies must be open Images of the stores' tables "
                                         "(store.SHARD_TABLES, reddit_replies.REPLY_TABLES)");
        return -1;
    }
    return 0;
}

/* The arguments parsed and fields_of(obj); *answer set when that is the caller's answer as it is: an error,
 * None, or fields whose text (the flag at final_at) needs clean_plain_text */
static PyObject *store_fields(PyObject *self, PyObject *args, const char *format, StoreArgs *a,
                              PyObject *(*fields_of)(PyObject *, PyObject *), int final_at, int *answer) {
    *answer = 1;
    if (store_args(args, format, a) < 0)
        return NULL;
    PyObject *f = fields_of(self, a->obj);
    *answer = f == NULL || f == Py_None || !PyObject_IsTrue(PyTuple_GET_ITEM(f, final_at));
    return f;
}

/* store.post_row of the reader's record: a question (question_id NULL: its own id; not distinguished) or an
 * answer (title ""), into the posts table (0) of the image; 0 on success */
static int add_post_row(Image *im, PyObject *site, PyObject *post_id, PyObject *question_id, PyObject *title,
                        PyObject *body, PyObject *score, PyObject *author, PyObject *created, PyObject *distinguished,
                        const StoreArgs *a) {
    int question = question_id == NULL;
    PyObject *qid = question ? post_id : question_id;
    if (bind(im, 0, 1, site) || bind_text(im, 0, 2, "reddit") || bind(im, 0, 3, post_id) ||
        bind_numeric_key(im, 0, 4, post_id) || bind_text(im, 0, 5, question ? "question" : "answer") ||
        bind_int(im, 0, 6, !question) || bind(im, 0, 7, qid) || bind_numeric_key(im, 0, 8, qid) ||
        bind(im, 0, 9, title) || bind(im, 0, 10, body) || bind_text(im, 0, 11, "") || bind(im, 0, 12, score) ||
        bind_text(im, 0, 13, "") || bind(im, 0, 14, author) || bind(im, 0, 15, a->license) ||
        bind_text(im, 0, 16, "") || bind(im, 0, 17, created) ||
        (distinguished == NULL ? bind_int(im, 0, 18, 0) : bind(im, 0, 18, distinguished)) ||
        bind(im, 0, 19, a->file) || bind(im, 0, 20, a->line))
        return -1;
    return step(im, 0);
}

static PyObject *store_comment(PyObject *self, PyObject *args) {
    StoreArgs a;
    int answer;
    PyObject *f = store_fields(self, args, "OOOO!UUp:store_comment", &a, comment_fields, 9, &answer);
    if (answer)
        return f;
    int with_replies = a.with_replies;
    PyObject *result = NULL;
    int is_reply = PyObject_IsTrue(PyTuple_GET_ITEM(f, 10));
    PyObject *post_id = PyTuple_GET_ITEM(f, 0), *parent = PyTuple_GET_ITEM(f, 1), *qid = PyTuple_GET_ITEM(f, 2),
             *site = PyTuple_GET_ITEM(f, 3), *score = PyTuple_GET_ITEM(f, 4), *created = PyTuple_GET_ITEM(f, 5),
             *author = PyTuple_GET_ITEM(f, 6), *dist = PyTuple_GET_ITEM(f, 7), *body = PyTuple_GET_ITEM(f, 8);
    if (with_replies) { /* reddit_replies.comment_row */
        PyObject *row[13] = {post_id, parent, qid,     site,   body,   score, created,
                             author,  dist,   a.license, a.file, a.line, PyTuple_GET_ITEM(f, 10)};
        if (add_values((Image *)a.replies, 0, row) < 0)
            goto done;
    }
    if (is_reply) {
        result = PyLong_FromLong(with_replies ? 1 : 2);
        goto done;
    }
    if (add_post_row((Image *)a.posts, site, post_id, qid, empty, body, score, author, created, dist, &a))
        goto done;
    result = PyLong_FromLong(1);
done:
    Py_DECREF(f);
    return result;
}

/* store_submission(obj, posts, replies, line, license, file, with_replies): store_comment for a submission
 * (submission_fields; its rows: a question post, and with reply pairs a row of the reply store's submissions) */
static PyObject *store_submission(PyObject *self, PyObject *args) {
    StoreArgs a;
    int answer;
    PyObject *f = store_fields(self, args, "OOOO!UUp:store_submission", &a, submission_fields, 7, &answer);
    if (answer)
        return f;
    PyObject *result = NULL;
    PyObject *post_id = PyTuple_GET_ITEM(f, 0), *site = PyTuple_GET_ITEM(f, 1), *score = PyTuple_GET_ITEM(f, 2),
             *created = PyTuple_GET_ITEM(f, 3), *author = PyTuple_GET_ITEM(f, 4), *title = PyTuple_GET_ITEM(f, 5),
             *body = PyTuple_GET_ITEM(f, 6);
    if (a.with_replies) {
        PyObject *row[6] = {post_id, site, title, body, score, author};
        if (add_values((Image *)a.replies, 1, row) < 0)
            goto done;
    }
    if (add_post_row((Image *)a.posts, site, post_id, NULL, title, body, score, author, created, NULL, &a))
        goto done;
    result = PyLong_FromLong(1);
done:
    Py_DECREF(f);
    return result;
}

static PyMethodDef methods[] = {
    {"comment_fields", comment_fields, METH_O,
     "The reader's values for an ordinary Pushshift comment (orjson's dict), or None: see the module's source."},
    {"submission_fields", submission_fields, METH_O,
     "The reader's values for an ordinary Pushshift submission (orjson's dict), or None: see the module's source."},
    {"store_comment", store_comment, METH_VARARGS, "An ordinary comment's rows into a worker's images: see the source."},
    {"store_submission", store_submission, METH_VARARGS,
     "An ordinary submission's rows into a worker's images: see the source."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastreddit", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastreddit(void) {
    struct {
        PyObject **slot;
        const char *name;
    } keys[] = {{&k_id, "id"},          {&k_parent_id, "parent_id"},         {&k_link_id, "link_id"},
                {&k_subreddit, "subreddit"}, {&k_score, "score"},            {&k_ups, "ups"},
                {&k_created_utc, "created_utc"}, {&k_author, "author"},      {&k_distinguished, "distinguished"},
                {&k_body, "body"},   {&k_title, "title"},                 {&k_selftext, "selftext"}};
    for (int c = 0; c < 0x20; c++)
        special[c] = 1;
    special['&'] = special[0x7f] = 1;
    if ((reddit_prefix = PyUnicode_InternFromString("reddit/")) == NULL ||
        (name_prefix = PyUnicode_InternFromString("name:")) == NULL || (empty = PyUnicode_New(0, 0)) == NULL)
        return NULL;
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        if ((*keys[i].slot = PyUnicode_InternFromString(keys[i].name)) == NULL)
            return NULL;
    if (PyType_Ready(&ImageType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ImageType);
    if (PyModule_AddObject(m, "Image", (PyObject *)&ImageType) < 0) {
        Py_DECREF(&ImageType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
