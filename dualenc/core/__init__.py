"""Core helpers every other package may use: the user-error type, atomic files, locks, quiet
TensorFlow start-up, run configuration and run directories. Imports nothing else of dualenc."""
