"""Helper for the head-selection tests: logits of a cluster head whose errors are controlled."""
import numpy as np


def noisy_head(truth, noise, classes, rng):
    """Logits [N, C] of a head that predicts a permutation of `truth`, with a share `noise` of rows moved at random."""
    labels = truth.copy()
    flip = rng.random(len(truth)) < noise
    labels[flip] = rng.integers(0, classes, flip.sum())
    labels = rng.permutation(classes)[labels]
    logits = rng.normal(0, 0.1, (len(truth), classes))
    logits[np.arange(len(truth)), labels] += 5
    return logits
