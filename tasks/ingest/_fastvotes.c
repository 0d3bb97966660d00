/*
 * alignflow.tasks.ingest._fastvotes: votes per post counted from the bytes of plain Votes.xml rows.
 *
 * count_votes(data: bytes, site: str, votes: dict) -> (rows, other) | None
 *
 * The C form of ranges.count_vote_lines plus the tally scan_votes makes of its result. ``data`` holds
 * whole lines of vote rows exactly as the dumps write them, one per line or several (as an XML library
 * writes a table, with no line end between rows), separated by white space: what the regular expression
 * ranges._VOTE_ROWS accepts:
 *
 *   data := gap (row gap)*                                     gap := (" " | "\t" | "\n" | "\r\n")*
 *   row  := <row Id="D" PostId="D" VoteTypeId="D"  [ UserId="-?D"]  [ CreationDate="[0-9T:.-]{1,40}"]
 *           [ BountyAmount="D"]  [ ] />                                           D := [0-9]{1,18}
 *
 * If the data is not, nothing is counted and None comes back (the range then goes to the XML parser).
 * Otherwise each vote of type 2, 3 or 1 (up, down, accepted) adds one to slot 0, 1 or 2 of
 * ``votes[(site, post_id)]`` (a list [up, down, accepted], made when missing), post_id being the
 * PostId's digits as written; votes of any other type are only counted, in ``other``. ``rows`` is the
 * number of rows. tests/test_ingest_parallel.py compares it with the regular expression on generated
 * and mutated lines.
 *
 * A range's votes, counted over its pieces and handed over as an SQLite image (no Python object per post):
 *
 *   tally = open_tally()
 *   tally_lines(tally, data) -> (rows, other) | None     the same rows and counts as count_votes; None: the
 *                                                         data is not plain rows, and the tally is to be dropped
 *   image = tally_image(tally, site, posts_columns, votes_columns)
 *
 * newlines(data, start, end) -> int: the '\n' bytes of data[start:end] (as bytes.count, ~10x faster).
 *
 * The image holds the store's two tables (store.shard_image's form): no posts, and one votes row
 * (site, post_id, up, down, accepted) per post with a vote of type 2, 3 or 1, in the byte order of the
 * post ids, which is the order of the parent's key. tests/test_ingest_parallel.py compares it with
 * shard_image of count_votes' dict.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

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

/* The row that starts at p, ending before ``end``: the PostId's value and length and the VoteTypeId's digits;
 * *after: the byte after its "/>". */
static int vote_row(const char *p, const char *end, uint64_t *post, uint32_t *post_len, const char **type,
                    uint32_t *type_len, const char **after) {
    uint64_t v;
    uint32_t n;
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
    if (!LIT(&p, end, "/>"))
        return 0;
    *after = p;
    return 1;
}

/* Past the white space between rows (" ", "\t", "\n", "\r\n"); a lone "\r" is not (XML reads a line end). */
static const char *skip_gap(const char *p, const char *end) {
    while (p < end) {
        if (*p == ' ' || *p == '\t' || *p == '\n')
            p++;
        else if (*p == '\r' && end - p >= 2 && p[1] == '\n')
            p += 2;
        else
            break;
    }
    return p;
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

/* Count the rows of [p, end) into ``table``: 1, 0 when it is not plain rows, -1 out of memory. */
static int count_lines(Table *table, const char *p, const char *end, Py_ssize_t *rows, Py_ssize_t *other) {
    for (;;) {
        p = skip_gap(p, end);
        if (p >= end)
            return 1;
        uint64_t post;
        uint32_t post_len, type_len;
        const char *type, *after;
        if (!vote_row(p, end, &post, &post_len, &type, &type_len, &after))
            return 0;
        (*rows)++;
        int slot = type_len != 1 ? -1 : *type == '2' ? 0 : *type == '3' ? 1 : *type == '1' ? 2 : -1;
        if (slot < 0) {
            (*other)++;
        } else {
            Entry *e = table_get(table, post, post_len);
            if (e == NULL)
                return -1;
            e->n[slot]++;
        }
        p = after;
    }
}

static PyObject *count_votes(PyObject *module, PyObject *args) {
    (void)module;
    Py_buffer data;
    PyObject *site, *votes;
    if (!PyArg_ParseTuple(args, "y*UO!:count_votes", &data, &site, &PyDict_Type, &votes))
        return NULL;
    Table table = {0};
    Py_ssize_t rows = 0, other = 0;
    int counted;
    Py_BEGIN_ALLOW_THREADS
    counted = count_lines(&table, data.buf, (const char *)data.buf + data.len, &rows, &other);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    PyObject *result = NULL;
    if (counted < 0) {
        PyErr_NoMemory();
    } else if (counted == 0) {
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

/* -- a range's tally and its SQLite image ------------------------------------------------------------ */

static const char *TALLY = "alignflow.tasks.ingest._fastvotes.Tally";

static void tally_free(PyObject *capsule) {
    Table *t = PyCapsule_GetPointer(capsule, TALLY);
    if (t != NULL) {
        PyMem_RawFree(t->slots);
        PyMem_RawFree(t);
    }
}

static PyObject *open_tally(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
    Table *t = PyMem_RawCalloc(1, sizeof(Table));
    if (t == NULL)
        return PyErr_NoMemory();
    PyObject *capsule = PyCapsule_New(t, TALLY, tally_free);
    if (capsule == NULL)
        PyMem_RawFree(t);
    return capsule;
}

static PyObject *tally_lines(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *capsule;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "Oy*:tally_lines", &capsule, &data))
        return NULL;
    Table *t = PyCapsule_GetPointer(capsule, TALLY);
    if (t == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    Py_ssize_t rows = 0, other = 0;
    int counted;
    Py_BEGIN_ALLOW_THREADS
    counted = count_lines(t, data.buf, (const char *)data.buf + data.len, &rows, &other);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (counted < 0)
        return PyErr_NoMemory();
    if (counted == 0)
        Py_RETURN_NONE;
    return Py_BuildValue("(nn)", rows, other);
}

/* A post id's digits as the dumps wrote them (leading zeros included); returns their number. */
static uint32_t digits_of(const Entry *e, char text[20]) {
    uint64_t v = e->value;
    for (int i = (int)e->len - 1; i >= 0; i--) {
        text[i] = (char)('0' + v % 10);
        v /= 10;
    }
    return e->len;
}

/* An entry and a key whose numeric order is the byte order (SQLite's BINARY collation) of the post id's first
 * 16 digits: one nibble per digit (digit + 1), then zeros, so that a prefix comes before the ids it starts. */
typedef struct {
    uint64_t key;
    const Entry *entry;
} Sorted;

static uint64_t order_key(const Entry *e) {
    char text[20] = {0};
    uint32_t n = digits_of(e, text);
    uint64_t key = 0;
    for (uint32_t i = 0; i < 16; i++)
        key = (key << 4) | (i < n ? (uint64_t)(text[i] - '0' + 1) : 0);
    return key;
}

/* The byte order of two post ids. */
static int id_order(const Entry *x, const Entry *y) {
    char a[20], b[20];
    uint32_t m = digits_of(x, a), n = digits_of(y, b);
    int c = memcmp(a, b, m < n ? m : n);
    return c ? c : (m > n) - (m < n);
}

/* ``items`` in the byte order of their post ids: a radix sort of the keys (8 bits a pass, a pass skipped where
 * every item has the same byte), then ids longer than 16 digits that share a key ordered by their digits. Returns
 * the sorted array: ``items`` or ``spare``. */
static Sorted *sort_by_id(Sorted *items, Sorted *spare, size_t n) {
    for (int shift = 0; shift < 64 && n > 1; shift += 8) {
        size_t at[257] = {0};
        for (size_t i = 0; i < n; i++)
            at[((items[i].key >> shift) & 255) + 1]++;
        if (at[((items[0].key >> shift) & 255) + 1] == n)
            continue;
        for (int b = 1; b <= 256; b++)
            at[b] += at[b - 1];
        for (size_t i = 0; i < n; i++)
            spare[at[(items[i].key >> shift) & 255]++] = items[i];
        Sorted *swap = items;
        items = spare;
        spare = swap;
    }
    for (size_t i = 1; i < n; i++) { /* insertion sort: only runs of equal keys move */
        Sorted x = items[i];
        size_t j = i;
        while (j > 0 && items[j - 1].key == x.key && id_order(items[j - 1].entry, x.entry) > 0) {
            items[j] = items[j - 1];
            j--;
        }
        items[j] = x;
    }
    return items;
}

/* The image's bytes, or NULL with *error set (an SQLite message, or NULL: out of memory). */
static unsigned char *image_of(const Table *t, const char *site, Py_ssize_t site_len, const char *posts_types,
                               const char *votes_types, sqlite3_int64 *size, char **error) {
    sqlite3 *db = NULL;
    sqlite3_stmt *insert = NULL;
    unsigned char *image = NULL;
    Sorted *keys = NULL, *sorted = NULL;
    size_t n = 0;
    *error = NULL;
    if (t->used) {
        keys = malloc(2 * t->used * sizeof(Sorted));
        if (keys == NULL)
            return NULL;
        for (size_t i = 0; t->slots && i <= t->mask; i++)
            if (t->slots[i].len)
                keys[n++] = (Sorted){order_key(&t->slots[i]), &t->slots[i]};
        sorted = sort_by_id(keys, keys + n, n);
    }
    char *sql = sqlite3_mprintf("PRAGMA page_size=65536; CREATE TABLE posts (%s); CREATE TABLE votes (%s); BEGIN",
                                posts_types, votes_types);
    int rc = sql == NULL ? SQLITE_NOMEM : sqlite3_open(":memory:", &db);
    if (rc == SQLITE_OK)
        rc = sqlite3_exec(db, sql, NULL, NULL, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_prepare_v2(db, "INSERT INTO votes VALUES (?,?,?,?,?)", -1, &insert, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_text(insert, 1, site, (int)site_len, SQLITE_STATIC);
    char text[20]; /* bound as is: rebound before every step, in scope until the statement is finalised */
    for (size_t i = 0; i < n && rc == SQLITE_OK; i++) {
        const Entry *e = sorted[i].entry;
        rc = sqlite3_bind_text(insert, 2, text, (int)digits_of(e, text), SQLITE_STATIC);
        for (int j = 0; j < 3 && rc == SQLITE_OK; j++)
            rc = sqlite3_bind_int64(insert, 3 + j, (sqlite3_int64)e->n[j]);
        if (rc == SQLITE_OK) {
            rc = sqlite3_step(insert);
            rc = rc == SQLITE_DONE ? sqlite3_reset(insert) : rc;
        }
    }
    if (rc == SQLITE_OK)
        rc = sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
    if (rc == SQLITE_OK) {
        image = sqlite3_serialize(db, "main", size, 0);
        rc = image == NULL ? SQLITE_NOMEM : SQLITE_OK;
    }
    if (rc != SQLITE_OK && rc != SQLITE_NOMEM && db != NULL)
        *error = sqlite3_mprintf("%s", sqlite3_errmsg(db));
    sqlite3_finalize(insert);
    sqlite3_close(db);
    sqlite3_free(sql);
    free(keys);
    return image;
}

static PyObject *tally_image(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *capsule;
    const char *site, *posts_types, *votes_types;
    Py_ssize_t site_len;
    if (!PyArg_ParseTuple(args, "Os#ss:tally_image", &capsule, &site, &site_len, &posts_types, &votes_types))
        return NULL;
    Table *t = PyCapsule_GetPointer(capsule, TALLY);
    if (t == NULL)
        return NULL;
    sqlite3_int64 size = 0;
    char *error = NULL;
    unsigned char *image;
    Py_BEGIN_ALLOW_THREADS
    image = image_of(t, site, site_len, posts_types, votes_types, &size, &error);
    Py_END_ALLOW_THREADS
    if (image == NULL) {
        if (error == NULL)
            return PyErr_NoMemory();
        PyErr_Format(PyExc_RuntimeError, "tally_image: %s", error);
        sqlite3_free(error);
        return NULL;
    }
    PyObject *bytes = PyBytes_FromStringAndSize((const char *)image, (Py_ssize_t)size);
    sqlite3_free(image);
    return bytes;
}

/* '\n' bytes in [p, end), counted in blocks of up to 255 bytes whose per-byte matches (0 or 1) fit a byte:
 * a loop the compiler vectorises. */
static Py_ssize_t count_newlines(const unsigned char *p, const unsigned char *end) {
    Py_ssize_t n = 0;
    while (p < end) {
        size_t block = (size_t)(end - p) < 255 ? (size_t)(end - p) : 255;
        unsigned char c = 0;
        for (size_t i = 0; i < block; i++)
            c += p[i] == '\n';
        n += c;
        p += block;
    }
    return n;
}

static PyObject *newlines(PyObject *module, PyObject *args) {
    (void)module;
    Py_buffer data;
    Py_ssize_t start, end;
    if (!PyArg_ParseTuple(args, "y*nn:newlines", &data, &start, &end))
        return NULL;
    if (start < 0 || end > data.len || start > end) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_IndexError, "newlines: start and end must satisfy 0 <= start <= end <= len(data)");
        return NULL;
    }
    const unsigned char *p = data.buf;
    Py_ssize_t n;
    Py_BEGIN_ALLOW_THREADS
    n = count_newlines(p + start, p + end);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return PyLong_FromSsize_t(n);
}

static PyMethodDef methods[] = {
    {"count_votes", count_votes, METH_VARARGS,
     "count_votes(data, site, votes) -> (rows, other) | None: votes of plain vote rows added to votes."},
    {"open_tally", open_tally, METH_NOARGS, "open_tally() -> tally: a range's votes per post, empty."},
    {"tally_lines", tally_lines, METH_VARARGS,
     "tally_lines(tally, data) -> (rows, other) | None: count_votes into the tally (None: drop the tally)."},
    {"tally_image", tally_image, METH_VARARGS,
     "tally_image(tally, site, posts_columns, votes_columns) -> bytes: the tally as an SQLite image."},
    {"newlines", newlines, METH_VARARGS, "newlines(data, start, end) -> int: data.count(b'\\n', start, end)."},
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
