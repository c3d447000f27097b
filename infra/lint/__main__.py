"""`python -m infra.lint`: see infra/lint/__init__.py."""
import sys

from . import main

sys.exit(main())
