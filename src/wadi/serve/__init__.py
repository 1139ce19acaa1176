"""``wadi serve``: a local page that generates one-step images as you type.

``engine`` (load once, ``generate(prompt, seed)`` -> PNG bytes + ms; no UI), ``app`` (the
standard library's HTTP server and routes), ``page`` (the HTML page), ``student`` (the
small digits student shipped in ``wadi/toy/assets/student`` and how it was made), ``cli``.
Importing this package loads nothing heavy, so ``wadi --help`` stays fast.
"""
