"""`python -m serving --help`: generate model_repository/ from exported runs and run tritonserver."""

import sys

from serving.cli import main

sys.exit(main())
