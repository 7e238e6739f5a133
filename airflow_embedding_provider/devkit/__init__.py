"""Tools for local runs, tests and benchmarks: sample data, an embedded PostgreSQL, the demo.

Nothing here is needed by a production Airflow deployment.
"""
