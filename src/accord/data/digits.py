"""scikit-learn's bundled 8×8 digits (1797 images, values 0..16), with a fixed test split."""

from __future__ import annotations

import numpy as np

from accord.data._common import RawData, check_labels

TEST_FRACTION = 0.2
# The split is part of the dataset's definition, so its seed is a constant, not an option.
_TEST_SEED = 0


def load_digits() -> RawData:
    """Read the digits (float64 images N×1×8×8 in 0..16), holding out the same 20 % as test."""
    # Imported here: scikit-learn takes about a second to import and only digits needs it.
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = bunch.images[:, None]
    labels = check_labels(np.asarray(bunch.target), len(images), 10, "sklearn digits")
    order = np.random.default_rng(_TEST_SEED).permutation(len(labels))
    num_test = round(TEST_FRACTION * len(labels))
    test, train = np.sort(order[:num_test]), np.sort(order[num_test:])
    return RawData(
        train_images=images[train],
        train_labels=labels[train],
        test_images=images[test],
        test_labels=labels[test],
        class_names=tuple(str(d) for d in range(10)),
        max_value=16.0,
    )
