import sys

from chatrl.cli import main

sys.exit(main())
