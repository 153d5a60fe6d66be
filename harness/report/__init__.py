"""Trials -> DataFrame -> Pareto ranking -> CSV, self-contained HTML and a console table."""
