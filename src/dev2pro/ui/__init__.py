"""`dev2pro ui`: a local web app over the same CLI (models, dataset + captions, train, monitor, results).

Modules: ``workspace`` (the only paths the browser can name), ``jobs`` (queued detached `dev2pro` subprocesses that
survive the UI), ``runner`` (the wrapper that records a job's exit), ``forms`` (config schema <-> form),
``trainform`` (the Train page's Basics/Advanced layout and labels), ``planview`` (the plan before Start, GPU
facts, the start-up warm-up), ``monitor`` (what a run folder says), ``app`` + ``routes_*`` (HTTP), ``command``
(the CLI entry), ``static/``.
"""
