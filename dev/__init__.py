"""Tools for local runs, tests and benchmarks, outside the provider package.

Sample data, an embedded PostgreSQL, the reference API server (a stand-in for the real one, with
fault injection), the demo, the local stack, the Redis broker and the Airflow cluster harness of
the tests. A production Airflow deployment needs none of it, so none of it is in the wheel or the
Docker image. Run from the repository root: ``python -m dev sample ...``, ``python -m dev
api-server ...``, ``python -m dev.demo``.
"""
