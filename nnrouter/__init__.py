"""nnrouter: a DICOM router that knows what is in the picture."""

__version__ = "0.1.0"
