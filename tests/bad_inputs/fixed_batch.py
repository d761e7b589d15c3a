"""A valid target whose get_batch() takes no batch size."""

from _helpers import small_batch, small_model


def build_model():
    return small_model()


def get_batch():
    return small_batch()
