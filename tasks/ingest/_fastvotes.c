/*
 * alignflow.tasks.ingest._fastvotes: votes per post counted from the bytes of plain Votes.xml rows.
 *
 * count_votes(data: bytes, site: str, votes: dict) -> (rows, other) | None
 *
 * The C form of ranges.count_vote_lines plus the tally scan_votes makes of its result. ``data`` holds
 * whole lines; every line must be a vote row exactly as the dumps write it, which is what the regular
 * expression ranges._VOTE_LINE accepts:
 *
 *   [ \t]* <row Id="D" PostId="D" VoteTypeId="D"  [ UserId="-?D"]  [ CreationDate="[0-9T:.-]{1,40}"]
 *          [ BountyAmount="D"]  [ ] />  [\r]                                       D := [0-9]{1,18}
 *
 * If one line is not, nothing is counted and None comes back (the range then goes to the XML parser).
 * Otherwise each vote of type 2, 3 or 1 (up, down, accepted) adds one to slot 0, 1 or 2 of
 * ``votes[(site, post_id)]`` (a list [up, down, accepted], made when missing), post_id being the
 * PostId's digits as written; votes of any other type are only counted, in ``other``. ``rows`` is the
 * number of lines. tests/test_ingest_parallel.py compares it with the regular expression on generated
 * and mutated lines.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* A post id of at most 18 digits is its value and its length (leading zeros are kept apart). */
typedef struct {
    uint64_t value;
    uint32_t len; /* 0: an empty slot */
    Py_ssize_t n[3];
} Entry;

typedef struct {
    Entry *slots;
    size_t mask, used;
} Table;

static uint64_t mix(uint64_t v, uint32_t len) {
    v ^= (uint64_t)len << 59;
    v ^= v >> 33;
    v *= 0xff51afd7ed558ccdULL;
    v ^= v >> 33;
    v *= 0xc4ceb9fe1a85ec53ULL;
    v ^= v >> 33;
    return v;
}

/* The raw allocator: the table grows while the GIL is released. */
static int table_grow(Table *t) {
    size_t cap = t->slots ? (t->mask + 1) * 2 : 1024;
    Entry *slots = PyMem_RawCalloc(cap, sizeof(Entry));
    if (slots == NULL)
        return -1;
    if (t->slots) {
        for (size_t i = 0; i <= t->mask; i++) {
            Entry *e = &t->slots[i];
            if (!e->len)
                continue;
            size_t j = mix(e->value, e->len) & (cap - 1);
            while (slots[j].len)
                j = (j + 1) & (cap - 1);
            slots[j] = *e;
        }
        PyMem_RawFree(t->slots);
    }
    t->slots = slots;
    t->mask = cap - 1;
    return 0;
}

static Entry *table_get(Table *t, uint64_t value, uint32_t len) {
    if (t->slots == NULL || (t->used + 1) * 4 > (t->mask + 1) * 3) {
        if (table_grow(t) < 0)
            return NULL;
    }
    size_t j = mix(value, len) & t->mask;
    while (t->slots[j].len) {
        if (t->slots[j].value == value && t->slots[j].len == len)
            return &t->slots[j];
        j = (j + 1) & t->mask;
    }
    t->slots[j].value = value;
    t->slots[j].len = len;
    t->used++;
    return &t->slots[j];
}

/* Match literal ``lit`` at *p; advance past it. */
static int lit(const char **p, const char *end, const char *s, size_t n) {
    if ((size_t)(end - *p) < n || memcmp(*p, s, n) != 0)
        return 0;
    *p += n;
    return 1;
}

#define LIT(p, end, s) lit(p, end, s, sizeof(s) - 1)

/* 1 to 18 ASCII digits, then '"'; their value and count. */
static int digits(const char **p, const char *end, uint64_t *value, uint32_t *len) {
    const char *s = *p;
    uint64_t v = 0;
    while (s < end && *s >= '0' && *s <= '9' && s - *p < 19) {
        v = v * 10 + (uint64_t)(*s - '0');
        s++;
    }
    Py_ssize_t n = s - *p;
    if (n < 1 || n > 18 || s >= end || *s != '"')
        return 0;
    *value = v;
    *len = (uint32_t)n;
    *p = s + 1;
    return 1;
}

/* One line [p, end) (without its '\n'); the PostId's value and length and the VoteTypeId's digits. */
static int vote_line(const char *p, const char *end, uint64_t *post, uint32_t *post_len, const char **type,
                     uint32_t *type_len) {
    uint64_t v;
    uint32_t n;
    if (end > p && end[-1] == '\r')
        end--;
    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    if (!LIT(&p, end, "<row Id=\"") || !digits(&p, end, &v, &n))
        return 0;
    if (!LIT(&p, end, " PostId=\"") || !digits(&p, end, post, post_len))
        return 0;
    if (!LIT(&p, end, " VoteTypeId=\""))
        return 0;
    *type = p;
    if (!digits(&p, end, &v, type_len))
        return 0;
    if (LIT(&p, end, " UserId=\"")) {
        if (p < end && *p == '-')
            p++;
        if (!digits(&p, end, &v, &n))
            return 0;
    }
    if (LIT(&p, end, " CreationDate=\"")) {
        const char *s = p;
        while (p < end && ((*p >= '0' && *p <= '9') || *p == 'T' || *p == ':' || *p == '.' || *p == '-'))
            p++;
        if (p == s || p - s > 40 || !LIT(&p, end, "\""))
            return 0;
    }
    if (LIT(&p, end, " BountyAmount=\"") && !digits(&p, end, &v, &n))
        return 0;
    if (p < end && *p == ' ')
        p++;
    return LIT(&p, end, "/>") && p == end;
}

static int add_to(PyObject *votes, PyObject *site, const Entry *e) {
    char text[20];
    uint64_t v = e->value;
    for (int i = (int)e->len - 1; i >= 0; i--) {
        text[i] = (char)('0' + v % 10);
        v /= 10;
    }
    PyObject *key = Py_BuildValue("(Os#)", site, text, (Py_ssize_t)e->len);
    if (key == NULL)
        return -1;
    PyObject *counts = PyDict_GetItemWithError(votes, key); /* borrowed */
    int rc = -1;
    if (counts == NULL) {
        if (PyErr_Occurred())
            goto done;
        counts = Py_BuildValue("[nnn]", e->n[0], e->n[1], e->n[2]);
        if (counts == NULL)
            goto done;
        rc = PyDict_SetItem(votes, key, counts);
        Py_DECREF(counts);
        goto done;
    }
    if (!PyList_Check(counts) || PyList_GET_SIZE(counts) != 3) {
        PyErr_SetString(PyExc_TypeError, "count_votes: votes must map keys to [up, down, accepted] lists");
        goto done;
    }
    for (int i = 0; i < 3; i++) {
        if (!e->n[i])
            continue;
        PyObject *was = PyList_GET_ITEM(counts, i);
        PyObject *add = PyLong_FromSsize_t(e->n[i]);
        if (add == NULL)
            goto done;
        PyObject *sum = PyNumber_Add(was, add);
        Py_DECREF(add);
        if (sum == NULL)
            goto done;
        PyList_SetItem(counts, i, sum); /* steals sum, releases was */
    }
    rc = 0;
done:
    Py_DECREF(key);
    return rc;
}

static PyObject *count_votes(PyObject *module, PyObject *args) {
    (void)module;
    Py_buffer data;
    PyObject *site, *votes;
    if (!PyArg_ParseTuple(args, "y*UO!:count_votes", &data, &site, &PyDict_Type, &votes))
        return NULL;
    const char *p = data.buf, *end = p + data.len;
    Table table = {0};
    Py_ssize_t rows = 0, other = 0;
    int plain = 1, failed = 0;
    Py_BEGIN_ALLOW_THREADS
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *stop = nl ? nl : end;
        uint64_t post;
        uint32_t post_len, type_len;
        const char *type;
        if (!vote_line(p, stop, &post, &post_len, &type, &type_len)) {
            plain = 0;
            break;
        }
        rows++;
        int slot = type_len != 1 ? -1 : *type == '2' ? 0 : *type == '3' ? 1 : *type == '1' ? 2 : -1;
        if (slot < 0) {
            other++;
        } else {
            Entry *e = table_get(&table, post, post_len);
            if (e == NULL) {
                failed = 1;
                break;
            }
            e->n[slot]++;
        }
        p = nl ? nl + 1 : end;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    PyObject *result = NULL;
    if (failed) {
        PyErr_NoMemory();
    } else if (!plain) {
        result = Py_NewRef(Py_None);
    } else {
        int ok = 1;
        for (size_t i = 0; table.slots && i <= table.mask && ok; i++)
            if (table.slots[i].len && add_to(votes, site, &table.slots[i]) < 0)
                ok = 0;
        if (ok)
            result = Py_BuildValue("(nn)", rows, other);
    }
    PyMem_RawFree(table.slots);
    return result;
}

static PyMethodDef methods[] = {
    {"count_votes", count_votes, METH_VARARGS,
     "count_votes(data, site, votes) -> (rows, other) | None: votes of plain vote rows added to votes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fastvotes",
    .m_doc = "Votes per post counted from the bytes of plain Votes.xml rows (see the top of _fastvotes.c).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fastvotes(void) { return PyModule_Create(&module); }
