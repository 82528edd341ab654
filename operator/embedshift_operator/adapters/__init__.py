"""Adapters: the core's ports over real systems (Prometheus, PostgreSQL, Jobs, alerts).

Each adapter implements one narrow protocol of :mod:`embedshift_operator.core` over one system
and turns that system's failures into the core's errors. Adapters do not import each other.
"""
