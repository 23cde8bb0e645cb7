"""HDF5 feature store: vectors keyed by patient ID, one feature set per encoder configuration."""

from mmdx.store.api import FeatureSetInfo, FeatureStore, set_name_for
from mmdx.store.format import FORMAT_VERSION, FeatureSet, Rows, SetHeader

__all__ = ["FORMAT_VERSION", "FeatureSet", "FeatureSetInfo", "FeatureStore", "Rows", "SetHeader", "set_name_for"]
