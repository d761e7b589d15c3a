"""Every parameter is frozen: there is no training step to check."""

from _helpers import small_batch, small_model


def build_model():
    model = small_model()
    model.requires_grad_(False)
    return model


def get_batch():
    return small_batch()
