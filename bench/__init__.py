"""``make bench``: the ingest engine against a COPY ceiling and a naive baseline, in one run.

``python -m bench.run`` orchestrates; each measurement runs in its own child process
(``python -m bench.measure``) so that its peak RSS is its own.
"""
