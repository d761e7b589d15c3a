"""A training script whose command-line parsing runs at import time."""

import argparse

import torch.nn as nn

parser = argparse.ArgumentParser()
parser.add_argument("--data", required=True)
ARGS = parser.parse_args()
model = nn.Linear(8, 4)
