/* What _fasthtml.c and _fastposts.c agree on: the capsule _fasthtml exports as ``render_utf8`` (its renderer for
 * C callers), the function it holds, and the results of that function and of _fasthtml's parsing steps.
 *
 * A RenderUtf8 takes a body's UTF-8 bytes (valid UTF-8, no surrogate) and returns OK with the body's text in a
 * PyMem_Malloc buffer (*text: NULL when empty) that the caller frees; OUTSIDE when the body is not in the
 * renderer's subset (html_to_text decides); ERROR when out of memory (no Python exception is set). It needs the
 * GIL (PyMem). A caller gets it with PyCapsule_GetPointer(capsule, RENDER_UTF8_CAPSULE), which fails loudly
 * on a capsule of any other name. */
#ifndef ALIGNFLOW_RENDER_UTF8_H
#define ALIGNFLOW_RENDER_UTF8_H

#include <Python.h>

#define RENDER_UTF8_CAPSULE "alignflow.tasks.ingest._fasthtml.render_utf8"

typedef int (*RenderUtf8)(const char *html, Py_ssize_t n, char **text, Py_ssize_t *text_len);

enum { OK = 0, OUTSIDE = 1, ERROR = -1 };

#endif
