import sys

from fse.cli.main import main

sys.exit(main())
