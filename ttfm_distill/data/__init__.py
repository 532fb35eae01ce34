"""Training data for distillation: ``build_data`` turns ``cfg.data`` into a source.

* ``teacher`` (default): data-free, the teacher's own ODE samples (``pool.py``);
* ``fashion-mnist``: the Debian Fashion-MNIST files (``fashion_mnist.py``);
* anything else: a local image folder / parquet / arrow / ``save_to_disk``
  folder or a hub id, read through ``datasets`` (``hf.py``).

Images are decoded, converted and resized once into an on-disk cache
(uint8 pixels; for latent teachers, the teacher's encodings), so training
draws batches by indexing a tensor.  See :func:`build_data`.
"""

from __future__ import annotations

from .build import DataBuilder, ExactData, build_data
from .errors import DataError
from .pool import TeacherPool, build_pool
from .sources import DataSource, StreamingSource, TensorSource

__all__ = ["build_data", "DataBuilder", "DataError", "DataSource", "TensorSource", "TeacherPool", "StreamingSource",
           "ExactData", "build_pool"]
