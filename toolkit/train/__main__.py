import sys

from toolkit.train.cli import main

sys.exit(main())
