"""Result backends: keep task states and return values. One module per store."""
