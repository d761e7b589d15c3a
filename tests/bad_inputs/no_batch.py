"""A model without get_batch(): needs --input-shape."""

from _helpers import small_model

model = small_model()
