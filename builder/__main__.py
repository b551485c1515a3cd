"""`python -m builder` runs the pybuild command."""
import sys

from .cli import main

sys.exit(main())
