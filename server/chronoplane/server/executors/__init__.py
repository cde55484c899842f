"""Executors: where a task's code runs once an execution is recorded."""
