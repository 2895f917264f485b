"""The collector's tuning defaults, shared by `Collector` and the CLI without importing either.

Batches are large because every commit becomes a part in each table of the store, and parts are
later merged: at 8,192 spans a batch, background merges cost the embedded store nearly as much
CPU as the inserts themselves. Under light load the timer commits sooner, so a lone request waits
at most `DEFAULT_BATCH_MS` for company.
"""

from __future__ import annotations

import os

DEFAULT_BATCH_SPANS = 32768
DEFAULT_BATCH_MS = 200.0
DEFAULT_QUEUE_SPANS = 131072
DEFAULT_QUEUE_BYTES = 512 << 20
# The standalone collector decodes in one process per CPU (see collector.decoders).
DEFAULT_DECODERS = (os.cpu_count() or 1) if (os.cpu_count() or 1) > 1 else 0
