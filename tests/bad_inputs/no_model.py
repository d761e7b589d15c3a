"""Defines a batch but no model under any name trainlint looks for."""

from _helpers import small_batch, small_model

net = small_model()


def get_batch():
    return small_batch()
