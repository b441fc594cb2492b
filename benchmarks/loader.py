"""Loader throughput rows: ours vs keras' image_dataset_from_directory, and augmented vs plain tf.data."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf

import loader
from benchmarks.data import CLASSES, SIZE
from loader.formats import JPEG, NATIVE
from loader.images import decode, jpeg_scales, uniform_jpeg

BATCH = 32
IMAGE_SIZE = (224, 224)
AUGMENT = dict(flip=0.5, rotate=0.5, brightness=0.5, contrast=0.5, hue=0.5, saturation=0.5)
FIT_EPOCHS = 3


def epoch_rate(dataset: tf.data.Dataset) -> float:
    """Images per second over one pass of a finite dataset."""
    count, start = 0, time.perf_counter()
    iterator = iter(dataset)
    for batch in iterator:
        count += int(tf.shape(batch[0])[0])
    elapsed = time.perf_counter() - start
    del iterator  # stop its background threads now, not whenever the collector runs: they would eat a core
    gc.collect()
    return count / elapsed


def interleaved(
    candidates: dict[str, tf.data.Dataset],
    rounds: int,
    rate: Callable[[tf.data.Dataset], float] = epoch_rate,
) -> dict[str, list[float]]:
    """Rates of each candidate (``rate``: by default images/s over one epoch) over ``rounds`` interleaved
    rounds, after one warm-up run each.

    This machine's usable CPU swings between about one and two cores within seconds: a slow phase that spans
    a back-to-back pair cancels in their ratio, and the median over rounds (:func:`paired`) damps the rest.
    """
    for dataset in candidates.values():
        rate(dataset)
    rates: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, dataset in candidates.items():
            rates[name].append(rate(dataset))
    return rates


def paired(ours: list[float], baseline: list[float]) -> float:
    """The median over rounds of ours / baseline, each pair measured back to back."""
    return float(np.median(np.asarray(ours) / np.asarray(baseline)))


def keras_baseline(folder: Path) -> tf.data.Dataset:
    import keras

    dataset = keras.utils.image_dataset_from_directory(
        folder, image_size=IMAGE_SIZE, batch_size=BATCH, seed=0, shuffle=True, verbose=False
    )
    return dataset.prefetch(tf.data.AUTOTUNE)


def plain_tf_data(folder: Path) -> tf.data.Dataset:
    """Decode + resize in tf.data, the textbook way, no augmentation."""
    files = sorted(str(p) for p in folder.rglob("*.jpg"))

    def load(path: tf.Tensor) -> tf.Tensor:
        return tf.image.resize(tf.io.decode_jpeg(tf.io.read_file(path), channels=3), IMAGE_SIZE), 0

    dataset = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=0)
    return dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH).prefetch(tf.data.AUTOTUNE)


def ours(dataset_uri: str, files: int, **kwargs: object) -> tf.data.Dataset:
    """Our pipeline over every row; stratified and balanced sampling run as many draws as there are files."""
    dataset = loader.from_manifest(
        dataset_uri, purpose=None, batch_size=BATCH, image_size=IMAGE_SIZE, repeat=True, **kwargs
    )
    size = kwargs["balanced"][0] * kwargs["balanced"][1] if "balanced" in kwargs else BATCH
    return dataset.take(-(-files // size))


def fit_rate(images: int, epochs: int = FIT_EPOCHS) -> Callable[[tf.data.Dataset], float]:
    """A rate (for :func:`interleaved`): images/s of ``model.fit`` over ``epochs`` epochs of ``images`` each.

    The model (global average pooling, one dense layer) is too small to matter: this is the input pipeline as
    training sees it, where every epoch makes a new iterator and drops the last one. Each dataset keeps one
    model across calls, so only its first call traces the training step.
    """
    import keras

    models: dict[int, keras.Model] = {}

    def rate(dataset: tf.data.Dataset) -> float:
        model = models.get(id(dataset))
        if model is None:
            layers = [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(len(CLASSES))]
            model = models[id(dataset)] = keras.Sequential([keras.Input((*IMAGE_SIZE, 3)), *layers])
            model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        start = time.perf_counter()
        model.fit(dataset, epochs=epochs, verbose=0, shuffle=False)
        elapsed = time.perf_counter() - start
        gc.collect()
        return epochs * images / elapsed

    return rate


def kernel_rates(folder: Path, rounds: int, files: int = 600, ext: str = "jpg") -> dict[str, list[float]]:
    """Images per CPU-second of the decode+resize kernels alone, ours (at the loader's defaults) against keras',
    on the same bytes: no pipeline around them, one image after another in a single call, interleaved as the
    pipelines are; and of TensorFlow's decode alone, which both pay in full.

    Their ratio is what the loader row would show if neither pipeline cost anything beyond its kernels. For
    JPEG, both pay the entropy decoding in full, which no DCT scale avoids; the rest of the row's ratio is
    what the pipelines themselves cost per image.
    """
    data = tf.constant([path.read_bytes() for path in sorted(folder.rglob(f"*.{ext}"))[:files]])
    widths, heights = np.array([SIZE[0]]), np.array([SIZE[1]])
    formats = np.array(["jpeg" if ext == "jpg" else ext])
    scales = jpeg_scales(widths, heights, IMAGE_SIZE, None, False) if ext == "jpg" else np.zeros(1, np.int32)
    uniform = uniform_jpeg(formats, scales, widths, heights, IMAGE_SIZE, None)
    how, scale = tf.constant(JPEG if ext == "jpg" else NATIVE), tf.constant(int(scales[0]))

    def each(kernel: Callable[[tf.Tensor], tf.Tensor]) -> tf.data.Dataset:
        def run(batch: tf.Tensor) -> tf.Tensor:
            total = tf.constant(0.0)
            for i in tf.range(tf.shape(batch)[0]):
                total += tf.cast(kernel(batch[i])[0, 0, 0], tf.float32)
            return total

        # One element holding every image: the kernels run under tf.data's threading, as in both pipelines.
        return tf.data.Dataset.from_tensors(data).map(run)

    kernels = {
        "kernels: strata decode": each(lambda d: decode(d, how, scale, 3, IMAGE_SIZE, False, None, uniform)),
        # keras.utils.image_dataset_from_directory's own load_image, without the file read
        "kernels: keras decode": each(
            lambda d: tf.image.resize(tf.io.decode_image(d, channels=3, expand_animations=False), IMAGE_SIZE)
        ),
        "kernels: decode alone": each(lambda d: tf.io.decode_image(d, channels=3, expand_animations=False)),
    }
    if uniform is None:  # formats without a DCT scale: what the box prefilter costs on top
        kernels["kernels: strata decode, antialias=False"] = each(
            lambda d: decode(d, how, scale, 3, IMAGE_SIZE, False, None, None, antialias=False)
        )

    def cpu_rate(dataset: tf.data.Dataset) -> float:
        start = time.process_time()
        dataset.get_single_element()
        return int(data.shape[0]) / (time.process_time() - start)

    return interleaved(kernels, rounds, cpu_rate)


def measure_apart(folder: Path, dataset_uri: str, rounds: int, ext: str = "jpg") -> dict[str, list[float]]:
    """:func:`measure` (JPEG) or :func:`measure_format` (another ``ext``) in a fresh Python process, away from
    the Prefect server, the flow's threads and the heap the curation left behind; ours and the baselines
    still share that one process."""
    command = [sys.executable, "-m", "benchmarks.loader", str(folder), dataset_uri, str(rounds), ext]
    result = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if result.returncode != 0:
        raise RuntimeError(f"loader benchmark failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(folder: Path, dataset_uri: str, rounds: int) -> dict[str, list[float]]:
    """Per-round throughputs in images/s of our pipelines and the baselines, on the same files, interleaved
    so that each of ours runs right after the baseline it is judged against."""
    files = len(list(folder.rglob("*.jpg")))
    rates = interleaved(
        {
            "keras image_dataset_from_directory": keras_baseline(folder),
            "strata stratified": ours(dataset_uri, files),
            "plain tf.data decode+resize": plain_tf_data(folder),
            "strata stratified + augment": ours(dataset_uri, files, augment=loader.Augment(**AUGMENT)),
            "strata plain": ours(dataset_uri, files, stratify_by=None),
            "strata balanced": ours(dataset_uri, files, balanced=(3, 8)),
        },
        rounds,
    )
    training = interleaved(
        {
            "fit: keras image_dataset_from_directory": keras_baseline(folder),
            "fit: strata stratified": loader.from_manifest(
                dataset_uri, purpose=None, batch_size=BATCH, image_size=IMAGE_SIZE
            ),
        },
        rounds,
        fit_rate(files),
    )
    return {**rates, **training, **kernel_rates(folder, rounds)}


def measure_format(folder: Path, dataset_uri: str, rounds: int, ext: str) -> dict[str, list[float]]:
    """Per-round images/s of our stratified pipeline at its default quality settings, with a pixel cache
    (``cache_dir``: its warm-up epoch fills it) and without, and keras', on the same files of one format
    (``bmp``, ``png``), interleaved; the same epochs' images per CPU-second of this process ("cpu: ..."),
    which a busy machine sways less; and the kernels' rates (:func:`kernel_rates`)."""
    files = len(list(folder.rglob(f"*.{ext}")))
    cache = folder.parent / f"pixel-cache-{ext}"  # beside the images, in the run's work folder
    candidates = {
        "keras image_dataset_from_directory": keras_baseline(folder),
        "strata stratified, pixel cache": ours(dataset_uri, files, cache_dir=cache),
        "strata stratified": ours(dataset_uri, files),
    }
    cpu: dict[int, list[float]] = {id(dataset): [] for dataset in candidates.values()}
    warm_up: dict[int, float] = {}

    def rate(dataset: tf.data.Dataset) -> float:
        start = time.process_time()
        images_per_s = epoch_rate(dataset)
        cpu[id(dataset)].append(files / (time.process_time() - start))
        warm_up.setdefault(id(dataset), images_per_s)
        return images_per_s

    rates = interleaved(candidates, rounds, rate)
    per_cpu = {f"cpu: {name}": cpu[id(dataset)][1:] for name, dataset in candidates.items()}  # [0]: warm-up
    first = {f"first epoch: {name}": [warm_up[id(dataset)]] for name, dataset in candidates.items()}
    return {**rates, **per_cpu, **first, **kernel_rates(folder, rounds, files=min(files, 300), ext=ext)}


if __name__ == "__main__":
    folder, uri, rounds, ext = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    print(json.dumps(measure(folder, uri, rounds) if ext == "jpg" else measure_format(folder, uri, rounds, ext)))
