"""Models, data, the training loop, generation and drift: where torch lives."""

import logging

# bitsandbytes (imported by PEFT when installed) warns on every run, at import, that an optional CPU
# kernel package is absent; it uses its own kernels instead. Its errors still show.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
