"""CRC32C as TensorFlow stores it: in checkpoint bundles and in event files.

Uses the `crc32c` package (LGPL-2.1-or-later, loaded unmodified as a shared
library): measured on this project's benchmark machine it runs at 22 GiB/s on
a numpy buffer and releases the GIL, while Apache-2.0 `google-crc32c` 1.9
takes only read-only `bytes` (a copy per chunk), runs at 4.4 GiB/s and holds
the GIL, which would serialise the two averaging workers.
"""
from typing import Any

import crc32c as _crc32c

_MASK_DELTA = 0xa282ead8


def crc32c(data: Any, crc: int = 0) -> int:
  """The CRC32C of `data` (any buffer), continuing from `crc`."""
  return _crc32c.crc32c(data, crc)


def masked(crc: int) -> int:
  """TF's masked form of a CRC32C, as bundles and TFRecords store it."""
  return ((((crc >> 15) | (crc << 17)) & 0xffffffff) + _MASK_DELTA) & 0xffffffff
