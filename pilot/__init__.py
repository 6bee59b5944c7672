"""PanDA pilot: one job's life on a worker node, and everything Yoda and Droid share."""

__version__ = "0.1.0"
