"""python -m tops_edge.serve DIR [...]: the same as `tops-serve DIR [...]`."""

import sys

from ..cli import serve_main

sys.exit(serve_main())
