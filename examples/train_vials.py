"""Curate the bundled demo vials into a manifest, then train a tiny Keras classifier on it for one epoch.

    python examples/train_vials.py [--manifests DIR] [--epochs N]

The training side needs only ``loader`` (TensorFlow, pyarrow, pandas, s3fs): it reads the latest committed
version, draws class-balanced, augmented training batches and evaluates on the untouched devel split.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import keras

import loader
from strata.cli import main as strata


def train(manifests: str, epochs: int) -> dict[str, float]:
    """Train and evaluate on ``manifests/vials``; returns the final devel metrics."""
    dataset = f"{manifests}/vials"
    common = {"image_size": (96, 96), "rescale": "0-1", "seed": 0}
    train = loader.from_manifest(
        dataset,
        purpose="train",
        balanced=(3, 4),  # every batch: 3 classes x 4 images, whatever the class imbalance
        augment=loader.Augment(flip=0.5, rotate=0.5, max_angle=10, brightness=0.5, contrast=0.5, noise=0.3),
        **common,
    )
    devel = loader.from_manifest(dataset, purpose="devel", shuffle=False, batch_size=16, **common)
    classes = train.class_names
    print(f"version {train.version}, classes {classes}")

    model = keras.Sequential(
        [
            keras.Input((96, 96, 3)),
            keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(len(classes), activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    # shuffle=False: the loader already shuffles, seeded (Keras would ignore True for a dataset, with a warning)
    model.fit(train, validation_data=devel, epochs=epochs, verbose=2, shuffle=False)
    return model.evaluate(devel, return_dict=True, verbose=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifests", help="manifest root (default: a temporary folder)")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        manifests = os.path.abspath(args.manifests or scratch)
        if strata(["demo", "--manifests", manifests, "--quiet"]) != 0:
            raise SystemExit("curating the demo data failed; see the messages above")
        print("devel:", train(manifests, args.epochs))


if __name__ == "__main__":
    main()
