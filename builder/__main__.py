"""`python -m builder` runs the pybuild command."""
from .cli import run

run()
