"""Input data: sources (tfds, image-folder cache, synthetic), augmentation, grain pipelines.

Batches follow the "Batch contract" in docs/design.md: dicts of numpy arrays with
'image' float32 [b, H, W, 3] (or 'views', a tuple lowest resolution first when
views are asked for), 'label' int32 [b], and for eval 'mask' float32 [b].
"""

from adaptive_vision.data.pipeline import (
    iterator_checkpoint_args,
    load_image,
    local_batch_size,
    make_eval_iterator,
    make_train_dataset,
    make_train_iterator,
    num_eval_batches,
    preprocess,
)
from adaptive_vision.data.sources import (
    DatasetNotPreparedError,
    cache_root,
    class_names,
    dataset_info,
    get_source,
    image_files,
    num_examples,
)

__all__ = [
    "DatasetNotPreparedError",
    "cache_root",
    "class_names",
    "dataset_info",
    "get_source",
    "image_files",
    "iterator_checkpoint_args",
    "load_image",
    "local_batch_size",
    "make_eval_iterator",
    "make_train_dataset",
    "make_train_iterator",
    "num_eval_batches",
    "num_examples",
    "preprocess",
]
