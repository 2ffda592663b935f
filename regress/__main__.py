import sys

from regress.cli import main

sys.exit(main())
