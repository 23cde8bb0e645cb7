"""Encoders that turn images and texts into stored vectors.

Submodules import TensorFlow (images) or torch (texts) only inside the
functions that need them, so importing this package stays cheap.
"""
