"""Triton model repository generator, python-backend models and the embedded server."""
