"""Evaluation without pretrained networks (evaluate.py): the attribute reader (reader.py), the
figures (metrics.py) and the report (report.py)."""
