"""The base model as it is: the floor every method is measured from (one cell per model and task)."""
from .base import Method


class ZeroShot(Method):
    name = "zero_shot"
    seeded = False
    searched = False
