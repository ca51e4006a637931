"""Scaling-law sweeps: a YAML file of sizes x variants x budgets, planned, matched and run.

`spec` reads the sweep file and expands it into points; `matching` solves the head width and
expert counts that parameter-match each SwitchHead / SwitchAll point to its dense point (spec
§1.5); `plan` validates and counts every point before anything runs; `runner` runs them through
a backend (local subprocesses today) and resumes them; `results` writes `results.csv` / `.json`.
"""
