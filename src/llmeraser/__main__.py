"""`python -m llmeraser …`, which is also how torchrun starts it: `torchrun --nproc_per_node K -m llmeraser unlearn …`."""

import sys

from .cli import main

sys.exit(main())
