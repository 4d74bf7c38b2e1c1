"""``python -m trio_gateway`` is the ``trio-gateway`` command."""

import sys

from trio_gateway._cli import main

sys.exit(main())
