import sys

from llmlabs.cli import main

sys.exit(main())
