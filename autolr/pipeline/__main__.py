import sys

from autolr.pipeline.cli import main

sys.exit(main())
