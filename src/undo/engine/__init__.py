"""The engine: an experiment as a graph of stages (graph.py), the one stage helper that
caches, claims, runs, saves and records every stage (runner.py), executors that run a
graph in process or on Ray (executors.py), `undo plan` (plan.py) and `undo run` (run.py)."""
