"""The lowest layer: I/O, geometry, errors, tables and the arithmetic decision; imports nothing of femurseg above it."""
