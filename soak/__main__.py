"""``python -m soak``: the terminator memory soak (see ``soak.memory``)."""

import sys

from soak.memory import main

sys.exit(main())
