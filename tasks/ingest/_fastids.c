/*
 * alignflow.tasks.ingest._fastids: SHA-256 of every string of an Arrow string array, in one call.
 *
 * hex_digests(data, offsets, offset_bytes, length) -> bytes
 * first_words(data, offsets, offset_bytes) -> bytes
 *
 * ``data`` and ``offsets`` are the value and offset buffers of an Arrow string array (offset 0, no nulls;
 * ``offset_bytes`` 4 for ``string``, 8 for ``large_string``): string i is data[offsets[i]:offsets[i+1]].
 * hex_digests returns, for each string, the first ``length`` (1..64) lowercase hex characters of its
 * SHA-256, one after the other: what ``hashlib.sha256(s).hexdigest()[:length]`` gives. first_words returns
 * the first 8 bytes of each digest as a native uint64 (big-endian reading, as ``int.from_bytes(d[:8],
 * "big")``). The digests come from OpenSSL's libcrypto, the library behind Python's hashlib. The ids
 * module (tasks/ingest/ids.py) wraps both and falls back to hashlib without this module;
 * tests/test_ids.py compares the two.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/sha.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    Py_buffer data, offsets;
    Py_ssize_t n;
    int width;
} Strings;

static int64_t offset_at(const Strings *s, Py_ssize_t i) {
    if (s->width == 4) {
        int32_t v;
        memcpy(&v, (const char *)s->offsets.buf + i * 4, 4);
        return v;
    }
    int64_t v;
    memcpy(&v, (const char *)s->offsets.buf + i * 8, 8);
    return v;
}

static int strings_open(Strings *s, PyObject *data, PyObject *offsets, int width) {
    if (width != 4 && width != 8) {
        PyErr_SetString(PyExc_ValueError, "offset_bytes must be 4 or 8");
        return -1;
    }
    if (PyObject_GetBuffer(data, &s->data, PyBUF_SIMPLE) < 0)
        return -1;
    if (PyObject_GetBuffer(offsets, &s->offsets, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&s->data);
        return -1;
    }
    s->width = width;
    s->n = s->offsets.len / width - 1;
    if (s->offsets.len % width != 0 || s->n < 0) {
        PyErr_SetString(PyExc_ValueError, "offsets must hold n + 1 offsets of offset_bytes each");
        goto fail;
    }
    for (Py_ssize_t i = 0; i < s->n; i++) { /* checked once here: the loops below only read */
        int64_t start = offset_at(s, i), end = offset_at(s, i + 1);
        if (start < 0 || end < start || end > (int64_t)s->data.len) {
            PyErr_Format(PyExc_ValueError, "string %zd has offsets [%lld, %lld) outside the %zd bytes of data",
                         i, (long long)start, (long long)end, s->data.len);
            goto fail;
        }
    }
    return 0;
fail:
    PyBuffer_Release(&s->data);
    PyBuffer_Release(&s->offsets);
    return -1;
}

static void strings_close(Strings *s) {
    PyBuffer_Release(&s->data);
    PyBuffer_Release(&s->offsets);
}

/* The SHA-256 of string i (its offsets were checked by strings_open). */
static void digest_of(const Strings *s, Py_ssize_t i, unsigned char out[SHA256_DIGEST_LENGTH]) {
    int64_t start = offset_at(s, i), end = offset_at(s, i + 1);
    SHA256((const unsigned char *)s->data.buf + start, (size_t)(end - start), out);
}

static PyObject *hex_digests(PyObject *Py_UNUSED(self), PyObject *args) {
    static const char hex[] = "0123456789abcdef";
    PyObject *data, *offsets;
    int width, length;
    if (!PyArg_ParseTuple(args, "OOii", &data, &offsets, &width, &length))
        return NULL;
    if (length < 1 || length > 2 * SHA256_DIGEST_LENGTH) {
        PyErr_SetString(PyExc_ValueError, "length must be between 1 and 64");
        return NULL;
    }
    Strings s;
    if (strings_open(&s, data, offsets, width) < 0)
        return NULL;
    PyObject *result = PyBytes_FromStringAndSize(NULL, s.n * length);
    if (result == NULL) {
        strings_close(&s);
        return NULL;
    }
    char *out = PyBytes_AS_STRING(result);
    Py_BEGIN_ALLOW_THREADS
    unsigned char digest[SHA256_DIGEST_LENGTH];
    for (Py_ssize_t i = 0; i < s.n; i++) {
        digest_of(&s, i, digest);
        char *o = out + i * length;
        for (int k = 0; k < length; k++)
            o[k] = hex[(k & 1) ? (digest[k >> 1] & 15) : (digest[k >> 1] >> 4)];
    }
    Py_END_ALLOW_THREADS
    strings_close(&s);
    return result;
}

static PyObject *first_words(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *data, *offsets;
    int width;
    if (!PyArg_ParseTuple(args, "OOi", &data, &offsets, &width))
        return NULL;
    Strings s;
    if (strings_open(&s, data, offsets, width) < 0)
        return NULL;
    PyObject *result = PyBytes_FromStringAndSize(NULL, s.n * 8);
    if (result == NULL) {
        strings_close(&s);
        return NULL;
    }
    char *out = PyBytes_AS_STRING(result);
    Py_BEGIN_ALLOW_THREADS
    unsigned char digest[SHA256_DIGEST_LENGTH];
    for (Py_ssize_t i = 0; i < s.n; i++) {
        digest_of(&s, i, digest);
        uint64_t word = 0;
        for (int k = 0; k < 8; k++)
            word = (word << 8) | digest[k];
        memcpy(out + i * 8, &word, 8);
    }
    Py_END_ALLOW_THREADS
    strings_close(&s);
    return result;
}

static PyMethodDef methods[] = {
    {"hex_digests", hex_digests, METH_VARARGS,
     "hex_digests(data, offsets, offset_bytes, length) -> bytes: the first length hex characters of the "
     "SHA-256 of each string of an Arrow string array, concatenated."},
    {"first_words", first_words, METH_VARARGS,
     "first_words(data, offsets, offset_bytes) -> bytes: the first 8 bytes of each string's SHA-256, read "
     "big-endian, as native uint64 values."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_fastids", .m_doc = NULL, .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fastids(void) { return PyModule_Create(&module); }
