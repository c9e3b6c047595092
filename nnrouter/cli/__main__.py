import sys

from nnrouter.cli import main

sys.exit(main())
