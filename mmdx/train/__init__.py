"""Classification heads trained from stored vectors, with patient-level cross-validation."""
