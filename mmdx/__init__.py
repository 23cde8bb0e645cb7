"""mmdx: multimodal (MR image + clinical text) diagnosis research.

Encoders run once and store their vectors in an HDF5 feature store keyed by
patient ID; classification heads then train from the stored vectors.
"""

__version__ = "0.1.0"
