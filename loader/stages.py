"""``map`` stages whose functions TensorFlow prepares once per dataset, not again for every iteration.

``Dataset.map`` marks its function multi-device, so each new iterator (every epoch of ``model.fit``) places
and optimises the function graph with grappler again, nested functions included: 28 ms for the loader's
decode stage, 136 ms once the XLA augmentation program is part of it, before the first batch of every
epoch. A function carrying ``experimental_ints_on_device`` (TensorFlow's own attribute for functions it
runs on one device, used by its map-on-GPU stage) is instantiated as a single-device function: no
placement, no grappler, the same kernels and the same pixels. It suits functions whose ops all run on the
host, which is what tf.data runs map functions on; the GPU augmentation stage, pinned to a GPU, keeps
``Dataset.map``. Such a function must not return int32 tensors: the attribute turns their return nodes
into ``_DeviceRetval``, which tf.data's own graph rewrites (``inject_prefetch``) take for a dataset graph
and reject.

The stage is built from tf.data's internals (``StructuredFunctionWrapper``, the map ops). Where a TensorFlow
version lacks them, :func:`host_map` falls back to ``Dataset.map``: slower to start, the same elements.
"""

from __future__ import annotations

import logging
from typing import Callable

import tensorflow as tf

log = logging.getLogger("loader")

try:
    from tensorflow.python.data.ops import dataset_ops, structured_function
    from tensorflow.python.ops import gen_dataset_ops
except ImportError:  # pragma: no cover - depends on the TensorFlow build
    dataset_ops = None


def host_map(dataset: tf.data.Dataset, fn: Callable, parallel: bool = False) -> tf.data.Dataset:
    """``dataset.map(fn)`` (deterministic; ``parallel``: AUTOTUNE calls) with ``fn`` prepared once per dataset."""
    if dataset_ops is not None:
        try:
            return _HostMap(dataset, fn, parallel)
        except (AttributeError, TypeError) as err:  # pragma: no cover - an unknown TensorFlow version
            log.debug("host_map falls back to Dataset.map: %s", err)
    if parallel:
        return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.map(fn)


if dataset_ops is not None:

    class _HostMap(dataset_ops.UnaryDataset):
        """The map dataset op over a single-device function."""

        def __init__(self, dataset: tf.data.Dataset, fn: Callable, parallel: bool) -> None:
            self._input_dataset = dataset
            self._name = None
            # A fresh dict each time: the wrapper adds the function's name and tf.data marks to it.
            self._map_func = structured_function.StructuredFunctionWrapper(
                fn, "Dataset.map()", dataset=dataset, defun_kwargs={"experimental_ints_on_device": True}
            )
            if any(spec.dtype == tf.int32 for spec in tf.nest.flatten(self._map_func.output_structure)):
                raise ValueError(f"host_map: {fn} returns int32 tensors; return int64 and cast after the stage")
            function = self._map_func.function
            inputs = (dataset._variant_tensor, function.captured_inputs)
            if parallel:
                variant = gen_dataset_ops.parallel_map_dataset_v2(
                    *inputs,
                    f=function,
                    num_parallel_calls=tf.constant(tf.data.AUTOTUNE, tf.int64),
                    deterministic="true",
                    preserve_cardinality=True,
                    **self._common_args,
                )
            else:
                variant = gen_dataset_ops.map_dataset(
                    *inputs, f=function, preserve_cardinality=True, **self._common_args
                )
            super().__init__(dataset, variant)

        def _functions(self) -> list:
            return [self._map_func]

        @property
        def element_spec(self) -> object:
            return self._map_func.output_structure
