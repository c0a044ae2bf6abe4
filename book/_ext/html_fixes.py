"""A fix to the pages Jupyter Book 1 writes, so that they load without a JavaScript error.

Found by tests/browser/test_pages.py; a bug of the pinned Sphinx, not of the book.
"""


def _drop_duplicate_scripts(app, pagename, templatename, context, doctree):
    # Sphinx 7.4 lists an inline script that an extension adds after the builder started twice (its
    # filename None the first time, "" the second; sphinx-doc/sphinx#13402, fixed after 7.4).
    # sphinx-thebe's `const THEBE_JS_URL = ...` then throws "already been declared" on every page.
    seen, unique = set(), []
    for js in context["script_files"]:
        key = (js.filename or "", tuple(sorted(js.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    context["script_files"][:] = unique


def setup(app):
    app.connect("html-page-context", _drop_duplicate_scripts, priority=900)  # after others add theirs
    return {"parallel_read_safe": True, "parallel_write_safe": True}
