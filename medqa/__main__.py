import sys

from medqa.backends import import_unsloth_first

import_unsloth_first(sys.argv[1:])  # before the CLI imports Lightning, which imports transformers

from medqa.cli import main  # noqa: E402

main()
