"""``python -m qwen_grpc`` is the same command as ``qwen-grpc``."""

import sys

from qwen_grpc.cli import main

sys.exit(main())
