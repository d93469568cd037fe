"""``python -m loft_cli``: the same as the ``loft`` command."""

import sys

from loft_cli.main import main

sys.exit(main())
