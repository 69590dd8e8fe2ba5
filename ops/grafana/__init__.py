"""Switchyard's Grafana dashboards as code (``build.py``) and their check against a real
Prometheus (``check.py``)."""
