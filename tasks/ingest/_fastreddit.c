/*
 * alignflow.tasks.ingest._fastreddit: the fields of an ordinary Pushshift comment, checked in C.
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
 *   score (or ups when score is absent or null): an int within 64 bits (not a bool)
 *   created_utc: an int within 64 bits or a finite float (not a bool) -> float
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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

#define MAX_DEPTH 256
/* ASCII classes (ctype's depend on the locale) */
#define DIGIT(c) ((c) >= '0' && (c) <= '9')
#define ALPHA(c) (((c) | 0x20) >= 'a' && ((c) | 0x20) <= 'z')
#define XDIGIT(c) (DIGIT(c) || (((c) | 0x20) >= 'a' && ((c) | 0x20) <= 'f'))

static PyObject *reddit_prefix, *name_prefix, *empty;
static PyObject *k_id, *k_parent_id, *k_link_id, *k_subreddit, *k_score, *k_ups, *k_created_utc, *k_author,
    *k_distinguished, *k_body;

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
static int body_form(const unsigned char *s, Py_ssize_t a, Py_ssize_t b) {
    int form = 1;
    for (Py_ssize_t i = a; i < b; i++) {
        unsigned char c = s[i];
        if (c < 0x20) {
            if (c == '\t')
                continue;
            if (c != '\n')
                return 0;
            if (s[i - 1] == ' ' || s[i - 1] == '\t') /* i > a: s[a] is not whitespace */
                return 0;
            if (i + 2 < b && s[i + 1] == '\n' && s[i + 2] == '\n')
                return 0;
        } else if (c == 0x7f) {
            return 0;
        } else if (c == '&') {
            Py_ssize_t end;
            int r = reference(s, i, b, &end);
            if (r < 0)
                return 0;
            if (r > 0)
                form = 2;
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

static PyObject *comment_fields(PyObject *self, PyObject *obj) {
    (void)self;
    if (!PyDict_CheckExact(obj))
        Py_RETURN_NONE;
    Py_ssize_t a, b, pa, pb, sa, sb, la, lb;
    PyObject *id = get(obj, k_id), *parent = get(obj, k_parent_id), *sub = get(obj, k_subreddit);
    if (!ascii_bounds(id, &a, &b) || a == b || !ascii_bounds(parent, &pa, &pb) || pb - pa <= 3 ||
        !ascii_bounds(sub, &sa, &sb) || sa == sb)
        Py_RETURN_NONE;
    const char *p = (const char *)PyUnicode_1BYTE_DATA(parent) + pa;
    int is_reply = memcmp(p, "t1_", 3) == 0;
    if (!is_reply && memcmp(p, "t3_", 3) != 0)
        Py_RETURN_NONE;

    PyObject *score = get(obj, k_score);
    if (score == NULL)
        score = get(obj, k_ups);
    if (score == NULL || !PyLong_CheckExact(score))
        Py_RETURN_NONE;
    int overflow = 0;
    long long score_value = PyLong_AsLongLongAndOverflow(score, &overflow);
    if (overflow || (score_value == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }

    PyObject *created = get(obj, k_created_utc);
    double created_value;
    if (created == NULL)
        Py_RETURN_NONE;
    if (PyFloat_CheckExact(created)) {
        created_value = PyFloat_AS_DOUBLE(created);
        if (!isfinite(created_value))
            Py_RETURN_NONE;
    } else if (PyLong_CheckExact(created)) {
        long long c = PyLong_AsLongLongAndOverflow(created, &overflow);
        if (overflow || (c == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        created_value = PyLong_AsDouble(created); /* float(int), rounded as Python rounds it */
    } else {
        Py_RETURN_NONE;
    }

    PyObject *body = get(obj, k_body);
    if (body == NULL || !PyUnicode_CheckExact(body))
        Py_RETURN_NONE;
    int final = 0;
    Py_ssize_t ba = 0, bb = 0;
    if (ascii_bounds(body, &ba, &bb)) {
        const unsigned char *s = PyUnicode_1BYTE_DATA(body);
        if (ba == bb || (bb - ba == 9 && (memcmp(s + ba, "[deleted]", 9) == 0 || memcmp(s + ba, "[removed]", 9) == 0)))
            Py_RETURN_NONE; /* quarantined by the reader */
        final = body_form(s, ba, bb);
    }

    int wide = has_wide_float(obj, 0);
    if (wide)
        Py_RETURN_NONE;

    PyObject *link = get(obj, k_link_id);
    int distinguished = 0;
    PyObject *dist = get(obj, k_distinguished);
    if (dist != NULL && (distinguished = PyObject_IsTrue(dist)) < 0)
        return NULL;

    PyObject *post_id = NULL, *parent_s = NULL, *question_id = NULL, *site = NULL, *subreddit = NULL,
             *author_s = NULL, *body_s = NULL, *result = NULL;
    post_id = PyUnicode_Substring(id, a, b);
    parent_s = PyUnicode_Substring(parent, pa, pb);
    if (post_id == NULL || parent_s == NULL)
        goto done;
    if (link != NULL && PyUnicode_CheckExact(link)) {
        if (!ascii_bounds(link, &la, &lb)) /* a non-ASCII link_id: the reader decides */
            goto none;
        if (lb - la > 3 && memcmp(PyUnicode_1BYTE_DATA(link) + la, "t3_", 3) == 0)
            question_id = PyUnicode_Substring(link, la + 3, lb);
    }
    if (question_id == NULL && !PyErr_Occurred())
        question_id = is_reply ? (Py_INCREF(empty), empty) : PyUnicode_Substring(parent, pa + 3, pb);
    if (question_id == NULL)
        goto done;
    subreddit = PyUnicode_Substring(sub, sa, sb);
    if (subreddit == NULL || (site = PyUnicode_Concat(reddit_prefix, subreddit)) == NULL)
        goto done;
    PyObject *author = get(obj, k_author);
    if (author != NULL && PyUnicode_Check(author) && PyUnicode_GET_LENGTH(author) > 0)
        author_s = PyUnicode_Concat(name_prefix, author);
    else {
        author_s = empty;
        Py_INCREF(author_s);
    }
    if (author_s == NULL)
        goto done;
    if (final == 1)
        body_s = PyUnicode_Substring(body, ba, bb);
    else if (final == 2)
        body_s = decode_references(PyUnicode_1BYTE_DATA(body), ba, bb);
    else {
        body_s = body;
        Py_INCREF(body_s);
    }
    if (body_s == NULL)
        goto done;
    result = Py_BuildValue("(OOOOLdOiOii)", post_id, parent_s, question_id, site, score_value, created_value,
                           author_s, distinguished, body_s, final != 0, is_reply);
    goto done;
none:
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(post_id);
    Py_XDECREF(parent_s);
    Py_XDECREF(question_id);
    Py_XDECREF(site);
    Py_XDECREF(subreddit);
    Py_XDECREF(author_s);
    Py_XDECREF(body_s);
    return result;
}

static PyMethodDef methods[] = {
    {"comment_fields", comment_fields, METH_O,
     "The reader's values for an ordinary Pushshift comment (orjson's dict), or None: see the module's source."},
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
                {&k_body, "body"}};
    if ((reddit_prefix = PyUnicode_InternFromString("reddit/")) == NULL ||
        (name_prefix = PyUnicode_InternFromString("name:")) == NULL || (empty = PyUnicode_New(0, 0)) == NULL)
        return NULL;
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        if ((*keys[i].slot = PyUnicode_InternFromString(keys[i].name)) == NULL)
            return NULL;
    return PyModule_Create(&module);
}
