import sys

from internvl_tune.cli import main

sys.exit(main())
