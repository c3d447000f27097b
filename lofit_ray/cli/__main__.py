"""`python -m lofit_ray.cli ...` is the `lofit-ray` command."""
import sys

from . import main

sys.exit(main())
