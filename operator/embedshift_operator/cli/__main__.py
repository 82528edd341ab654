"""``python -m embedshift_operator.cli``: the ``embedshift`` console script."""

import sys

from embedshift_operator.cli import main

sys.exit(main())
