"""``python -m optax_ema.posthoc``: post-hoc EMA reconstruction from snapshots."""

import sys

from optax_ema.posthoc import main

if __name__ == "__main__":
  sys.exit(main())
